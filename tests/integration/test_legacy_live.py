"""Legacy-mode plumbing (docs/architecture.md) on a real two-node cluster, with a stand-in proxy.

The node rules, tunnels and TPROXY rules are installed on a cluster built without a mesh;
in each ztunnel pod a stand-in relay (IP_TRANSPARENT listeners on 15001/15006/15008 that
connect on to the original destination from the client's address) takes ztunnel's place.
That checks the plumbing alone: rules equal the reference, captured traffic reaches the
relay through the tunnels (VXLAN on a kernel without geneve), apps see client addresses,
and enrolling or unenrolling a pod leaves other pods' connections alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import podapps
import pytest
from podapps import APP_PORT, EchoServer, GreetingServer, read_line

from testbed.cluster import Cluster, Pod, Topology
from testbed.mesh.podsockets import IP_TRANSPARENT
from testbed.netlab import Netns
from testbed.redirect import create_mode
from testbed.redirect import legacy_rules as lr
from testbed.redirect.base import http_get
from testbed.redirect.legacy import LegacyMode, choose_tunnel, install_node_plumbing

RELAY_PORTS = (lr.OUTBOUND_PORT, lr.INBOUND_PLAINTEXT_PORT, lr.HBONE_PORT)


class StandInRelay:
    """Accepts TPROXY'd connections and relays them to their original destination,
    connecting from the client's own address as legacy ztunnel does."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.accepted: Counter[int] = Counter()
        self.listeners = [self._listen(port) for port in RELAY_PORTS]
        for sock in self.listeners:
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _transparent_socket(self) -> socket.socket:
        with self.ns.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        return sock

    def _listen(self, port: int) -> socket.socket:
        sock = self._transparent_socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(64)
        return sock

    def _accept(self, listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            self.accepted[port] += 1
            threading.Thread(target=self._relay, args=(conn, peer[0]), daemon=True).start()

    def _relay(self, conn: socket.socket, client_ip: str) -> None:
        upstream = self._transparent_socket()
        try:
            upstream.bind((client_ip, 0))
            upstream.connect(conn.getsockname())  # TPROXY: the original destination
        except OSError:
            upstream.close()
            conn.close()
            return
        threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()
        _pipe(conn, upstream)

    def close(self) -> None:
        for sock in self.listeners:
            sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(65536):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)


@dataclass
class Plumbed:
    cluster: Cluster
    facts: dict[str, lr.NodeFacts]
    ztunnels: dict[str, Pod]
    relays: dict[str, StandInRelay]
    enrolled: list[str] = field(default_factory=list)

    def pod(self, name: str) -> Pod:
        return self.cluster.pods[name]

    def node(self, name: str) -> Netns:
        return self.cluster.nodes[name].netns

    def enroll(self, pod: Pod) -> None:
        ztunnel = self.ztunnels[pod.node].netns
        lr.enroll(self.node(pod.node), ztunnel, pod.ip, self.facts[pod.node].host_ip)
        self.enrolled.append(pod.name)

    def unenroll(self, pod: Pod) -> None:
        ztunnel = self.ztunnels[pod.node].netns
        lr.unenroll(self.node(pod.node), ztunnel, pod.ip, self.facts[pod.node].host_ip)
        self.enrolled.remove(pod.name)

    def enrolled_ips(self, node: str) -> list[str]:
        return [self.pod(n).ip for n in self.enrolled if self.pod(n).node == node]


@pytest.fixture(scope="module")
def plumbed() -> Iterator[Plumbed]:
    cluster = Cluster("two_nodes", create_mode("none"))
    relays: dict[str, StandInRelay] = {}
    servers: list[EchoServer] = []
    try:
        cluster.start()
        kind, _ = choose_tunnel(cluster.nodes["node1"].netns, "auto")
        facts, ztunnels = {}, {}
        for name, node in cluster.nodes.items():
            pod = cluster.add_system_pod(
                name, f"ztunnel-{name}", namespace="istio-system", service_account="ztunnel"
            )
            facts[name] = lr.NodeFacts(node.underlay_ip, pod.ip, pod.spec.host_ifname, kind)
            install_node_plumbing(node.netns, pod.netns, facts[name])
            ztunnels[name] = pod
            relays[name] = StandInRelay(pod.netns)
        servers = [EchoServer(pod, backlog=64) for pod in cluster.pods.values()]
        state = Plumbed(cluster, facts, ztunnels, relays)
        for pod in cluster.pods.values():
            state.enroll(pod)
        yield state
    finally:
        for relay in relays.values():
            relay.close()
        for server in servers:
            server.close()
        cluster.stop()


# This suite gives every connection 10 s, and a failed greeting raises.
connect = functools.partial(podapps.connect, timeout=10.0)
greeting = functools.partial(podapps.greet, timeout=10.0)


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------- rules equal the reference


def test_node_rules_equal_the_reference(plumbed: Plumbed) -> None:
    for name, facts in plumbed.facts.items():
        node = plumbed.node(name)
        assert lr.installed_node_rules(node) == lr.expected_node_rules(facts)
        routing = lr.installed_routing(node, lr.NODE_RULE_PRIORITIES)
        assert routing == lr.expected_node_routing(facts, plumbed.enrolled_ips(name))
        assert lr.installed_ipset(node) == sorted(plumbed.enrolled_ips(name))
        for key, value in lr.node_sysctls(facts).items():
            assert node.get_sysctl(key) == str(value), key


def test_ztunnel_rules_equal_the_reference(plumbed: Plumbed) -> None:
    for name, facts in plumbed.facts.items():
        ztunnel = plumbed.ztunnels[name].netns
        assert lr.installed_ztunnel_rules(ztunnel) == lr.expected_ztunnel_rules(facts)
        shown = lr.installed_routing(ztunnel, lr.ZTUNNEL_RULE_PRIORITIES)
        local_hbone = [
            f"20002: from all to {ip} ipproto tcp dport 15008 lookup 100"
            for ip in plumbed.enrolled_ips(name)
        ]
        assert sorted(shown["rules"]) == sorted(
            [
                f"20000: from all fwmark {lr.TPROXY_MARK} lookup 100",
                *local_hbone,
                f"20003: from all fwmark {lr.ORIGINAL_SOURCE_RETURN_MARK} lookup 100",
            ]
        )
        assert shown["table 100"] == ["local default dev lo scope host"]


def test_tunnels_are_the_probed_kind_with_istio_vnis(plumbed: Plumbed) -> None:
    facts = plumbed.facts["node1"]
    details = plumbed.node("node1").run(["ip", "-d", "link", "show", "istioout"]).stdout
    assert f"{facts.tunnel} id 1001" in details
    inbound = plumbed.ztunnels["node1"].run(["ip", "-d", "addr", "show", "pistioin"]).stdout
    assert f"{facts.tunnel} id 1000" in inbound and "192.168.126.2/30" in inbound
    assert facts.tunnel == choose_tunnel(plumbed.node("node2"), "auto")[0]


# ---------------------------------------------------------------- the data path


@pytest.mark.parametrize("server", ["server1", "server2"], ids=["same-node", "cross-node"])
def test_captured_traffic_goes_through_the_relay_and_keeps_the_source(
    plumbed: Plumbed, server: str
) -> None:
    client, target = plumbed.pod("client"), plumbed.pod(server)
    before = plumbed.relays["node1"].accepted[lr.OUTBOUND_PORT]
    inbound_before = plumbed.relays[target.node].accepted[lr.INBOUND_PLAINTEXT_PORT]
    with connect(client, target.ip) as sock:
        assert read_line(sock) == f"{server} {client.ip}"
        payload = bytes(range(256)) * 4096  # 1 MiB through the relays
        assert echo(sock, payload) == payload
    assert plumbed.relays["node1"].accepted[lr.OUTBOUND_PORT] == before + 1
    if target.node != client.node:  # inbound capture on the destination node too
        assert plumbed.relays[target.node].accepted[lr.INBOUND_PLAINTEXT_PORT] == (
            inbound_before + 1
        )


def test_capture_on_the_ztunnel_veth_decodes_as_the_tunnel(plumbed: Plumbed) -> None:
    facts = plumbed.facts["node1"]
    node = plumbed.node("node1")
    dump = node.spawn(
        ["tcpdump", "-i", facts.ztunnel_veth, "-n", "-l", "-U", "udp", "port",
         str(facts.tunnel_port)],
        label="tcpdump-legacy",
    )  # fmt: skip
    try:
        time.sleep(0.8)  # tcpdump needs a moment before it captures
        client, server2 = plumbed.pod("client"), plumbed.pod("server2")
        greeting(client, server2.ip)
        time.sleep(0.5)
    finally:
        dump.terminate()
    text = dump.output()
    kind = "VXLAN" if facts.tunnel == "vxlan" else "Geneve"
    assert kind in text
    assert "vni 1001" in text.lower()
    assert f"{client.ip}." in text and f"{server2.ip}.{APP_PORT}" in text  # the inner TCP


def test_enrolling_and_unenrolling_leaves_other_connections_alone(plumbed: Plumbed) -> None:
    client, server1, server2 = plumbed.pod("client"), plumbed.pod("server1"), plumbed.pod("server2")
    node1 = plumbed.node("node1")
    with connect(client, server2.ip) as running:
        read_line(running)
        for _ in range(3):
            plumbed.unenroll(server1)
            assert server1.ip not in lr.installed_ipset(node1)
            assert echo(running, b"still here") == b"still here"
            relay = plumbed.relays["node1"]
            before = relay.accepted[lr.OUTBOUND_PORT]
            assert greeting(server1, server2.ip) == f"server2 {server1.ip}"
            assert relay.accepted[lr.OUTBOUND_PORT] == before  # not captured any more
            plumbed.enroll(server1)
            assert echo(running, b"and here") == b"and here"
            assert greeting(server1, server2.ip) == f"server2 {server1.ip}"
            assert relay.accepted[lr.OUTBOUND_PORT] == before + 1
    facts = plumbed.facts["node1"]
    routing = lr.installed_routing(node1, lr.NODE_RULE_PRIORITIES)
    assert routing == lr.expected_node_routing(facts, plumbed.enrolled_ips("node1"))


def test_uninstall_removes_the_node_rules(plumbed: Plumbed) -> None:
    """Runs last: the plumbing is gone afterwards, and traffic flows directly."""
    node = plumbed.node("node2")
    lr.uninstall_node_rules(node)
    assert lr.installed_node_rules(node) == {}
    routing = lr.installed_routing(node, lr.NODE_RULE_PRIORITIES)
    assert routing == {"rules": [], "table 100": [], "table 101": [], "table 102": []}
    assert lr.installed_ipset(node) == []


# ---------------------------------------------------------------- with the project's ztunnel

USE_WAYPOINT = "istio.io/use-waypoint"
BOUND_PORT = 80


class LegacyMeshTopology(Topology):
    """A waypoint on the client's node in front of a service on the other node, and a pod
    of the client's node for the same-node fast path."""

    name = "legacy_mesh"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.add_waypoint("wp", "node1")
        self.add_pod("client", "node1", labels={"app": "client"})
        self.add_pod("neighbour", "node1", labels={"app": "neighbour"})
        self.add_pod("remote", "node2", labels={"app": "remote"})
        self.add_service(
            "bound",
            selector={"app": "remote"},
            ports={BOUND_PORT: APP_PORT},
            labels={USE_WAYPOINT: "wp"},
        )


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "no-fast-path"])
def mesh(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """One cluster per value of the option, built one after the other."""
    mode = create_mode("legacy", {"same_node_fast_path": request.param})
    cluster = Cluster(LegacyMeshTopology(), mode)
    servers: list[GreetingServer] = []
    try:
        cluster.start()
        servers = [GreetingServer(cluster.pods[name]) for name in ("neighbour",)]
        podapps.start_http_echo(cluster.pods["remote"])
        yield cluster
    finally:
        for server in servers:
            server.close()
        cluster.stop()


def _records(cluster: Cluster, node: str) -> list[dict[str, Any]]:
    mode = cluster.mode
    assert isinstance(mode, LegacyMode)
    body = http_get(mode.ztunnels[node].pod, 15000, "/connections")[1]
    records: list[dict[str, Any]] = json.loads(body)["connections"]
    return records


def _records_to(cluster: Cluster, node: str, original_dst: str) -> list[dict[str, Any]]:
    """The closed records of `node`'s ztunnel for connections to `original_dst`."""
    deadline = time.monotonic() + 5.0
    while True:
        found = [
            r for r in _records(cluster, node)
            if r["original_dst"] == original_dst and r["closed"] is not None
        ]  # fmt: skip
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_same_node_traffic_takes_the_fast_path_only_with_the_option(mesh: Cluster) -> None:
    assert isinstance(mesh.mode, LegacyMode)
    fast = mesh.mode.options.same_node_fast_path
    client, neighbour = mesh.pods["client"], mesh.pods["neighbour"]
    assert greeting(client, neighbour.ip) == f"neighbour {client.ip}"
    target = f"{neighbour.ip}:{APP_PORT}"
    [*_, outbound] = [r for r in _records_to(mesh, "node1", target) if r["listener"] == 15001]
    assert outbound["verdict"] == "allow"
    assert outbound["dst_identity"] == "spiffe://cluster.local/ns/default/sa/neighbour"
    inbound = [r for r in _records_to(mesh, "node1", target) if r["listener"] == 15008]
    if fast:  # served in-process: no HBONE, no TLS, no second hop through 15008
        assert outbound["path"] == "local" and outbound["upstream"] == target
        assert inbound == []
    else:  # over HBONE to this ztunnel's own 15008 (rule 20002)
        assert outbound["path"] == "hbone"
        assert outbound["upstream"] == f"{neighbour.ip}:15008"
        assert inbound and inbound[-1]["path"] == "hbone" and inbound[-1]["verdict"] == "allow"


def test_a_waypoint_on_the_clients_node_is_reached(mesh: Cluster) -> None:
    """HBONE to an uncaptured pod of ztunnel's own node (the waypoint) goes to that pod,
    not to ztunnel's own 15008 (the rule 20002 matches enrolled pods only)."""
    client, wp = mesh.pods["client"], mesh.pods["wp"]
    assert client.node == wp.node
    vip = mesh.services["bound"].vip
    replies = podapps.http_requests(client, vip, BOUND_PORT, "/", 3)
    assert [(r.status, r.served_by) for r in replies] == [(200, "remote")] * 3
    [*_, outbound] = _records_to(mesh, "node1", f"{vip}:{BOUND_PORT}")
    assert outbound["path"] == "waypoint" and outbound["upstream"] == f"{wp.ip}:15008"
