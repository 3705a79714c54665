"""Mode ebpf end to end on a real two-node cluster with the project's ztunnel: what the
conformance suite (test_conformance.py) cannot see from the outside. Traffic really goes
through ztunnel (its metrics count it, mTLS even on one node), programs sit on the right
devices, map entries follow enrollment, an unenrolled pod is not redirected, and teardown
leaves no program, pin or mount.

node1: captured `client` and `server1`; node2: captured `server2` and an uncaptured
`outsider` (istio.io/dataplane-mode: none). Every pod runs a server on APP_PORT that greets
with "<pod name> <peer ip>", then answers the sha256 of what it received.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest
from podapps import APP_PORT, GreetingServer, connect, finish, greeting, read_line

from testbed.cluster import Cluster, Pod, Topology
from testbed.cluster.clusterdns import DNS_SERVICE_VIP
from testbed.redirect import bpfload
from testbed.redirect.base import http_get
from testbed.redirect.ebpf import EbpfMode

TRANSFER = os.urandom(2 << 20)


class EbpfTopology(Topology):
    name = "ebpf_test"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.add_pod("client", "node1", labels={"app": "client"})
        self.add_pod("server1", "node1", service_account="server", labels={"app": "server"})
        self.add_pod("server2", "node2", service_account="server", labels={"app": "server"})
        self.add_pod("outsider", "node2", labels={"istio.io/dataplane-mode": "none"})
        self.add_service("server", selector={"app": "server"}, ports=[APP_PORT])


def transfer(pod: Pod, ip: str) -> tuple[str, bool]:
    """(greeting, whether the server's sha256 of TRANSFER matches)."""
    with connect(pod, ip) as sock:
        sock.settimeout(30)
        hello = read_line(sock)
        sock.sendall(TRANSFER)
        answer = finish(sock)
    return hello, answer == hashlib.sha256(TRANSFER).hexdigest()


def counter(mode: EbpfMode, node: str, name: str, at_least: float = 1, **labels: str) -> float:
    """A ztunnel metric summed over samples with `labels`, polled until `at_least`."""
    deadline = time.monotonic() + 5.0
    while True:
        text = http_get(mode.ztunnels[node].pod, 15020, "/metrics")[1].decode()
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        )
        if total >= at_least or time.monotonic() > deadline:
            return total
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(EbpfTopology(), EbpfMode())
    try:
        cluster.start()
        for pod in cluster.pods.values():
            GreetingServer(pod, APP_PORT, backlog=64)
        yield cluster
    finally:
        cluster.stop()


def _mode(cluster: Cluster) -> EbpfMode:
    assert isinstance(cluster.mode, EbpfMode)
    return cluster.mode


@pytest.mark.parametrize("server", ["server1", "server2"], ids=["same-node", "cross-node"])
def test_captured_to_captured_is_mtls_and_keeps_the_source(cluster: Cluster, server: str) -> None:
    client = cluster.pods["client"]
    hello, intact = transfer(client, cluster.pods[server].ip)
    assert hello == f"{server} {client.ip}"
    assert intact
    carried = counter(
        _mode(cluster), "node1", "istio_tcp_received_bytes_total",
        destination_workload=server, connection_security_policy="mutual_tls",
        at_least=len(TRANSFER),
    )  # fmt: skip
    assert carried >= len(TRANSFER)


def test_captured_to_uncaptured_passes_through_ztunnel(cluster: Cluster) -> None:
    client, outsider = cluster.pods["client"], cluster.pods["outsider"]
    assert greeting(client, outsider.ip) == f"outsider {client.ip}"
    closed = counter(
        _mode(cluster), "node1", "istio_tcp_connections_closed_total",
        destination_workload="outsider", connection_security_policy="unknown",
    )  # fmt: skip
    assert closed >= 1


def test_uncaptured_to_captured_goes_through_15006(cluster: Cluster) -> None:
    outsider, server1 = cluster.pods["outsider"], cluster.pods["server1"]
    assert greeting(outsider, server1.ip) == f"server1 {outsider.ip}"
    closed = counter(
        _mode(cluster), "node1", "istio_tcp_connections_closed_total",
        reporter="destination", source_workload="outsider",
    )  # fmt: skip
    assert closed >= 1


def test_service_vip_reaches_both_endpoints(cluster: Cluster) -> None:
    client = cluster.pods["client"]
    answers = {greeting(client, cluster.services["server"].vip) for _ in range(6)}
    assert answers == {f"server1 {client.ip}", f"server2 {client.ip}"}


def test_programs_sit_on_the_right_devices(cluster: Cluster) -> None:
    mode = _mode(cluster)
    for name in ("client", "server1", "server2"):
        pod = cluster.pods[name]
        node = cluster.nodes[pod.node].netns
        assert bpfload.attached_programs(node, pod.spec.host_ifname, "ingress") == ["app_outbound"]
        assert bpfload.attached_programs(node, pod.spec.host_ifname, "egress") == ["app_inbound"]
    outsider = cluster.pods["outsider"]
    node2 = cluster.nodes["node2"].netns
    assert bpfload.attached_programs(node2, outsider.spec.host_ifname, "ingress") == []
    for node_name, ztunnel in mode.ztunnels.items():
        node_ns = cluster.nodes[node_name].netns
        dev = ztunnel.pod.spec.host_ifname
        assert bpfload.attached_programs(node_ns, dev, "ingress") == ["ztunnel_host_ingress"]
        assert bpfload.attached_programs(ztunnel.pod.netns, "eth0", "ingress") == ["ztunnel_tproxy"]
    assert {e.ip for e in mode.datapaths["node2"].enrolled()} == {cluster.pods["server2"].ip}


def test_unenrolled_pod_is_not_redirected_and_can_come_back(cluster: Cluster) -> None:
    mode = _mode(cluster)
    outsider, server1 = cluster.pods["outsider"], cluster.pods["server1"]
    plain = {"reporter": "destination", "destination_workload": "server1"}
    mode.unenroll(server1)
    try:
        assert server1.ip not in {e.ip for e in mode.datapaths["node1"].enrolled()}
        node1 = cluster.nodes["node1"].netns
        assert bpfload.attached_programs(node1, server1.spec.host_ifname, "egress") == []
        before = counter(mode, "node1", "istio_tcp_connections_closed_total", 0, **plain)
        assert greeting(outsider, server1.ip) == f"server1 {outsider.ip}"
        time.sleep(0.3)  # a connection through ztunnel would be counted by now
        after = counter(mode, "node1", "istio_tcp_connections_closed_total", 0, **plain)
        assert after == before  # straight to the app, ztunnel never saw it
    finally:
        mode.enroll(server1)
    assert server1.ip in {e.ip for e in mode.datapaths["node1"].enrolled()}
    assert greeting(outsider, server1.ip) == f"server1 {outsider.ip}"
    assert counter(mode, "node1", "istio_tcp_connections_closed_total", 1, **plain) >= 1


def resolve(pod: Pod, name: str) -> tuple[int, str]:
    """`getent hosts NAME` in the pod (its own resolv.conf): exit status and address."""
    done = pod.run(["getent", "hosts", name], check=False, timeout=15)
    return done.returncode, (done.stdout.split() or [""])[0]


def udp_dns_answer(pod: Pod, name: str, timeout: float = 2.0) -> bytes | None:
    """One UDP query for `name` to the pod's nameserver; None when no answer comes."""
    query = dns.message.make_query(name, "A").to_wire()
    with pod.netns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.sendto(query, (DNS_SERVICE_VIP, 53))
        try:
            return sock.recv(4096)
        except TimeoutError:
            return None


def dns_dnat_count(cluster: Cluster, node: str) -> int:
    """Packets the DNS rule in ztunnel's namespace handed to its DNS proxy."""
    ztunnel = _mode(cluster).ztunnels[node].pod
    done = ztunnel.netns.run(["iptables", "-w", "-t", "nat", "-L", "PREROUTING", "-v", "-n", "-x"])
    rows = [line.split() for line in done.stdout.splitlines() if "dpt:53" in line]
    return sum(int(row[0]) for row in rows)


def test_udp_dns_is_answered_by_ztunnel(cluster: Cluster) -> None:
    client = cluster.pods["client"]
    vip = cluster.services["server"].vip
    before = dns_dnat_count(cluster, "node1")
    assert resolve(client, "server.default.svc.cluster.local") == (0, vip)
    assert dns_dnat_count(cluster, "node1") > before  # UDP 53 went to ztunnel's 15053
    # only ztunnel's proxy expands an absolute short name through the pod's search list
    assert resolve(client, "server.") == (0, vip)
    assert resolve(client, "nosuch.default.svc.cluster.local")[0] == 2
    # a pod out of the mesh asks the cluster DNS service, which answers FQDNs only
    assert resolve(cluster.pods["outsider"], "server.")[0] == 2


def test_without_its_ztunnel_a_pod_is_cut_off_until_it_is_back(cluster: Cluster) -> None:
    """Istio's fail-closed: no ztunnel attached for node1, its enrolled pods' traffic is
    dropped in tc (both directions), not sent around ztunnel."""
    mode = _mode(cluster)
    client, server1, outsider = (cluster.pods[n] for n in ("client", "server1", "outsider"))
    datapath = mode.datapaths["node1"]
    datapath.detach_ztunnel()
    try:
        with pytest.raises(OSError):
            connect(client, outsider.ip, timeout=2).close()
        with pytest.raises(OSError):
            connect(outsider, server1.ip, timeout=2).close()
        assert udp_dns_answer(client, "server.default.svc.cluster.local") is None
    finally:
        datapath.attach_ztunnel()
    assert greeting(client, outsider.ip) == f"outsider {client.ip}"
    assert greeting(outsider, server1.ip) == f"server1 {outsider.ip}"
    assert udp_dns_answer(client, "server.default.svc.cluster.local") is not None


def test_teardown_leaves_no_program_pin_or_mount(runs_root: Path) -> None:
    cluster = Cluster(EbpfTopology(), EbpfMode(), root=runs_root)
    cluster.start()
    mode = _mode(cluster)
    bpffs = cluster.workdir / "bpf"
    assert os.path.ismount(bpffs)
    pins = [dp.loaded.program(p) for dp in mode.datapaths.values() for p in bpfload.PROGRAMS]
    ids = {bpfload.program_id(pin) for pin in pins}
    assert len(ids) == 8 and ids <= bpfload.loaded_program_ids()
    cluster.stop()
    assert not bpffs.exists()
    deadline = time.monotonic() + 10
    while ids & bpfload.loaded_program_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ids & bpfload.loaded_program_ids() == set()
