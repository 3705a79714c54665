"""A Mininet Topo describes the underlay: switches become bridges, hosts become nodes."""

from pathlib import Path

import pytest

from testbed.cluster import Cluster, Topology, TopologyError, plan
from testbed.redirect import create_mode

mininet_topo = pytest.importorskip("mininet.topo")  # an optional dependency of users' scripts


def line_of_switches(loop: bool = False) -> object:
    topo = mininet_topo.Topo()
    s1, s2, s3 = (topo.addSwitch(f"s{i}") for i in (1, 2, 3))
    topo.addLink(s1, s2)
    topo.addLink(s2, s3)
    if loop:
        topo.addLink(s3, s1)
    topo.addLink(topo.addHost("h1"), s1, bw=500)
    topo.addLink(topo.addHost("h2"), s3)
    return topo


class MininetUnderlay(Topology):
    def __init__(self, loop: bool = False) -> None:
        super().__init__()
        self.loop = loop

    def build(self) -> None:
        self.add_mininet_underlay(line_of_switches(self.loop))
        self.add_pod("client", "h1", labels={"role": "client"})
        self.add_pod("server", "h2", labels={"role": "server"})


def test_hosts_become_nodes_across_three_bridges(runs_root: Path) -> None:
    with Cluster(MininetUnderlay(), create_mode("none"), root=runs_root) as cluster:
        assert set(cluster.nodes) == {"h1", "h2"}
        assert cluster.ping_all() == [] and cluster.tcp_all() == []
        assert cluster.fabric is not None
        bridges = cluster.fabric.run(["ip", "-o", "link", "show", "type", "bridge"]).stdout
        assert all(f"br{i}" in bridges for i in (1, 2, 3))
        qdisc = cluster.nodes["h1"].netns.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in qdisc and "500Mbit" in qdisc


def test_a_switch_loop_is_refused() -> None:
    with pytest.raises(TopologyError, match="form a loop"):
        plan(MininetUnderlay(loop=True))
