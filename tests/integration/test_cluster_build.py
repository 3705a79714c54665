"""Issue #2: clusters build, every pod reaches every other pod, the host stays untouched."""

from pathlib import Path

import pytest
from hoststate import netns_of_run, root_namespace_state

from testbed.cluster import Cluster, load_topology
from testbed.redirect import create_mode


@pytest.mark.parametrize("spec", ["single_node", "two_nodes", "multi_node,nodes=3,pods=10"])
def test_every_pod_reaches_every_pod(spec: str, runs_root: Path) -> None:
    before = root_namespace_state()
    cluster = Cluster(load_topology(spec), create_mode("none"), root=runs_root)
    with cluster:
        assert netns_of_run(cluster.run), "the cluster's namespaces exist while it runs"
        assert cluster.ping_all() == []
        assert cluster.tcp_all() == []
    assert netns_of_run(cluster.run) == []
    assert list(runs_root.iterdir()) == [], "manifest directory removed"
    assert root_namespace_state() == before


def test_same_node_and_cross_node_pairs(runs_root: Path) -> None:
    with Cluster(load_topology("two_nodes"), create_mode("none"), root=runs_root) as cluster:
        client, local = cluster.pair("same-node")
        _, remote = cluster.pair("cross-node")
        assert (client.node, local.node, remote.node) == ("node1", "node1", "node2")
        route = client.run(["ip", "route", "get", remote.ip]).stdout
        assert "via 10.244.1.1" in route
        hops = client.run(["ping", "-c", "1", "-W", "1", remote.ip]).stdout
        assert "ttl=62" in hops, "pod -> node1 -> node2 -> pod: two routed hops"


def test_service_vip_reaches_both_endpoints_without_mesh(runs_root: Path) -> None:
    """kube-proxy's DNAT in the node spreads a ClusterIP over its endpoints."""
    import socket

    with Cluster(load_topology("two_nodes"), create_mode("none"), root=runs_root) as cluster:
        vip = cluster.services["server"].vip
        servers = {}
        for name in ("server1", "server2"):
            with cluster.pod(name).netns.entered():
                servers[name] = socket.create_server(("0.0.0.0", 8080))
                servers[name].settimeout(0.01)
        hits = {name: 0 for name in servers}
        with cluster.pod("client").netns.entered():
            for _ in range(40):
                with socket.create_connection((vip, 8080), timeout=2):
                    for name, server in servers.items():
                        try:
                            server.accept()[0].close()
                            hits[name] += 1
                        except TimeoutError:
                            pass
        for server in servers.values():
            server.close()
        assert sum(hits.values()) == 40
        assert min(hits.values()) > 0, hits


def test_processes_are_recorded_and_stopped(runs_root: Path) -> None:
    with Cluster(load_topology("single_node"), create_mode("none"), root=runs_root) as cluster:
        proc = cluster.pod("client").spawn(["sleep", "300"], label="sleeper")
        entries = cluster.lab.manifest.entries() if cluster.lab else []
        assert any(e.kind == "process" and e["pid"] == proc.pid for e in entries)
    assert proc.poll() is not None


def test_two_testbeds_at_once_do_not_interfere(runs_root: Path) -> None:
    topo_a, topo_b = load_topology("two_nodes"), load_topology("two_nodes")
    none_a, none_b = create_mode("none"), create_mode("none")
    with Cluster(topo_a, none_a, root=runs_root) as a, Cluster(topo_b, none_b, root=runs_root) as b:
        assert set(netns_of_run(a.run)).isdisjoint(netns_of_run(b.run))
        assert a.ping_all() == [] and b.ping_all() == []
        b.stop()
        assert a.tcp_all() == []
