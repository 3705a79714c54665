"""Istio's own ztunnel as the inpod mode's ztunnel (`-o ztunnel=...`), on two_nodes.

Runs only with a binary: TESTBED_ZTUNNEL=/path/to/ztunnel (built with upstream's own
instructions). Two fleets: Istio's ztunnel on every node, and a mixed one (node1 Istio's,
node2 ours), where every cross-node connection is an HBONE tunnel between the two
implementations. Every pod runs a server that greets with "<pod> <peer ip>".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from podapps import APP_PORT, GreetingServer, greeting

from testbed.cluster import Cluster, Pod, load_topology
from testbed.measure.iperf import run_throughput
from testbed.redirect import create_mode
from testbed.redirect.base import http_get
from testbed.redirect.inpod import InPodMode
from testbed.redirect.istio_ztunnel import version_line

BINARY = os.environ.get("TESTBED_ZTUNNEL", "")
pytestmark = pytest.mark.skipif(
    not (BINARY and os.access(BINARY, os.X_OK)),
    reason="no Istio ztunnel binary: set TESTBED_ZTUNNEL to an executable built from istio/ztunnel",
)
FLEETS = {"istio-everywhere": lambda: BINARY, "mixed": lambda: f"node1:{BINARY}"}
METRICS_PORT = 15020
IPERF_PORT = 5201


@dataclass
class Mesh:
    fleet: str
    cluster: Cluster
    mode: InPodMode

    def pod(self, name: str) -> Pod:
        return self.cluster.pods[name]

    def metrics(self, node: str) -> str:
        return http_get(self.mode.ztunnels[node].pod, METRICS_PORT, "/metrics")[1].decode()


@pytest.fixture(scope="module", params=list(FLEETS))
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    mode = create_mode("inpod", {"ztunnel": FLEETS[request.param]()})
    assert isinstance(mode, InPodMode)
    cluster = Cluster(load_topology("two_nodes"), mode)
    servers: list[GreetingServer] = []
    try:
        cluster.start()
        servers = [GreetingServer(pod) for pod in cluster.pods.values()]
        print(f"{request.param}: {version_line(BINARY)[1]}")
        yield Mesh(request.param, cluster, mode)
    finally:
        for server in servers:
            server.close()
        cluster.stop()


@contextlib.contextmanager
def policy(mesh: Mesh, name: str, **spec: Any) -> Iterator[None]:
    topology = mesh.cluster.topology
    topology.add_policy(name, **spec)
    try:
        mesh.mode.update_policies(topology)
        yield
    finally:
        topology.remove_policy(name)
        mesh.mode.update_policies(topology)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def counter(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_the_chosen_nodes_run_istios_ztunnel(mesh: Mesh) -> None:
    istio_nodes = {"istio-everywhere": ["node1", "node2"], "mixed": ["node1"]}[mesh.fleet]
    assert sorted(mesh.mode.istio_binaries) == istio_nodes
    for node, proxy in mesh.mode.ztunnels.items():
        assert (proxy.argv == [BINARY]) == (node in istio_nodes)
    assert {"ztunnel-node1", "ztunnel-node2"} <= set(mesh.mode.proxy_pids())
    # The CA service is a process of the run (pid and log in its manifest), not a proxy.
    lab = mesh.cluster.lab
    assert lab is not None and mesh.mode.ca_process in lab.processes
    assert mesh.mode.ca_process.label == "istiod-ca-service"
    # Istio's admin port lists the pods our CNI agent handed it over ZDS.
    proxy = mesh.mode.ztunnels["node1"]
    status, body = http_get(proxy.pod, 15000, "/config_dump")
    assert status == 200 and b'"client"' in body


def test_cross_node_tcp_both_ways(mesh: Mesh) -> None:
    client, server1, server2 = mesh.pod("client"), mesh.pod("server1"), mesh.pod("server2")
    assert greeting(client, server2.ip) == f"server2 {client.ip}"  # node1 -> node2
    assert greeting(server2, server1.ip) == f"server1 {server2.ip}"  # node2 -> node1
    assert greeting(client, server1.ip) == f"server1 {client.ip}"  # same node


def test_cross_node_iperf3(mesh: Mesh) -> None:
    rows = run_throughput(
        mesh.pod("client"), mesh.pod("server2"), mesh.pod("server2").ip,
        duration=2, port=IPERF_PORT,
    )  # fmt: skip
    throughput = next(row for row in rows if row.metric == "throughput")
    assert throughput.value > 0


def test_metrics_show_the_connection(mesh: Mesh) -> None:
    client, server2 = mesh.pod("client"), mesh.pod("server2")
    name = "istio_tcp_connections_opened_total"
    before = counter(mesh.metrics("node1"), name, reporter="source")
    assert greeting(client, server2.ip) == f"server2 {client.ip}"
    deadline = time.monotonic() + 5.0
    while counter(mesh.metrics("node1"), name, reporter="source") <= before:
        assert time.monotonic() < deadline, mesh.metrics("node1")[-3000:]
        time.sleep(0.1)
    text = mesh.metrics("node1")
    assert 'destination_workload="server2"' in text or "server2" in text


@pytest.mark.parametrize("direction", ["node1-to-node2", "node2-to-node1"])
def test_l4_deny_policy_denies(mesh: Mesh, direction: str) -> None:
    if direction == "node1-to-node2":
        client, server, account = mesh.pod("client"), mesh.pod("server2"), "client"
    else:
        client, server, account = mesh.pod("server2"), mesh.pod("server1"), "server"
    deny = [{"principals": [f"cluster.local/ns/default/sa/{account}"]}]
    with policy(mesh, "deny-caller", action="DENY", selector={"app": "server"}, rules=deny):
        assert greeting(client, server.ip, timeout=3.0) is None
        enforcer = server.node
        if enforcer in mesh.mode.istio_binaries:  # Istio's ztunnel logs whose policy it was
            assert eventually(
                lambda: "explicitly denied by: default/deny-caller"
                in mesh.mode.ztunnels[enforcer].process.output()
            )
        else:
            assert eventually(
                lambda: any(r["verdict"] == "deny" for r in our_connections(mesh, enforcer))
            )
    assert greeting(client, server.ip) == f"{server.name} {client.ip}"


def our_connections(mesh: Mesh, node: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(
        http_get(mesh.mode.ztunnels[node].pod, 15000, "/connections")[1]
    )["connections"]
    return records


@pytest.mark.parametrize("mesh", ["mixed"], indirect=True)  # ours on node2 only there
def test_mixed_fleet_tunnels_hbone_between_the_two_implementations(mesh: Mesh) -> None:
    client, server1, server2 = mesh.pod("client"), mesh.pod("server1"), mesh.pod("server2")
    identity = "spiffe://cluster.local/ns/default/sa/{}".format
    # node1 (Istio's) -> node2 (ours): ours terminated Istio's HBONE on 15008.
    assert greeting(client, server2.ip) == f"server2 {client.ip}"
    inbound = [r for r in our_connections(mesh, "node2") if r["direction"] == "inbound"]
    assert any(
        r["listener"] == 15008 and r["path"] == "hbone" and r["src_identity"] == identity("client")
        and r["verdict"] == "allow"
        for r in inbound
    ), inbound  # fmt: skip
    # node2 (ours) -> node1 (Istio's): ours opened HBONE to Istio's 15008, Istio's counts it.
    name = "istio_tcp_connections_opened_total"
    before = counter(mesh.metrics("node1"), name, reporter="destination")
    assert greeting(server2, server1.ip) == f"server1 {server2.ip}"
    outbound = [r for r in our_connections(mesh, "node2") if r["direction"] == "outbound"]
    assert any(
        r["path"] == "hbone" and r["connect_target"] == f"{server1.ip}:{APP_PORT}"
        and r["upstream"] == f"{server1.ip}:15008"
        for r in outbound
    ), outbound  # fmt: skip
    deadline = time.monotonic() + 5.0
    while counter(mesh.metrics("node1"), name, reporter="destination") <= before:
        assert time.monotonic() < deadline, mesh.metrics("node1")[-3000:]
        time.sleep(0.1)
