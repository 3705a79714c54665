import pytest

from testbed.cluster import Topology, TopologyError, plan
from testbed.cluster.kubeproxy import render_service_rules
from testbed.cluster.loader import load_topology, parse_spec
from testbed.cluster.model import service_endpoints


def test_two_nodes_plan_assigns_addresses() -> None:
    topo = plan(load_topology("two_nodes"))
    assert [n.underlay_ip for n in topo.nodes.values()] == ["172.18.0.2", "172.18.0.3"]
    assert topo.nodes["node2"].pod_cidr == "10.244.2.0/24"
    assert topo.pods["client"].ip == "10.244.1.2"
    assert topo.pods["server2"].ip == "10.244.2.2"
    assert topo.services["server"].vip == "10.96.0.10"
    assert [p.name for p in service_endpoints(topo, topo.services["server"])] == [
        "server1",
        "server2",
    ]


def test_spec_string_parameters() -> None:
    assert parse_spec("multi_node,nodes=3,pods=10") == ("multi_node", {"nodes": 3, "pods": 10})
    topo = plan(load_topology("multi_node,nodes=3,pods=10"))
    assert len(topo.nodes) == 3 and len(topo.pods) == 30


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown topology 'nosuch'"),
        ("multi_node,nodes", "'nodes' is not of the form key=value"),
        (",nodes=3", "missing topology name"),
        ("multi_node,nodes=0", "nodes=0: expected a positive integer"),
        ("multi_node,colour=red", "bad parameters"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        plan(load_topology(spec))


class Broken(Topology):
    def build(self) -> None:
        raise RuntimeError("boom")


class Duplicate(Topology):
    def build(self) -> None:
        self.add_node("n1")
        self.add_pod("a", "n1")
        self.add_pod("a", "n1")


class Orphan(Topology):
    def build(self) -> None:
        self.add_node("n1")
        self.add_pod("a", "n2")


@pytest.mark.parametrize(
    ("topo", "message"),
    [
        (Broken(), "build\\(\\) raised RuntimeError: boom"),
        (Duplicate(), "duplicate pod name 'a'"),
        (Orphan(), "pod 'a' is placed on unknown node 'n2'"),
        (Topology(), "declares no nodes"),
    ],
)
def test_bad_topologies_name_the_problem(topo: Topology, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        plan(topo)


def test_too_many_pods_per_node() -> None:
    with pytest.raises(TopologyError, match="more than 250 pods"):
        plan(load_topology("multi_node,nodes=1,pods=251"))


def test_policy_rules_are_checked() -> None:
    topo = Topology()
    with pytest.raises(TopologyError, match="unknown field"):
        topo.add_policy("p", rules=[{"principal": ["x"]}])
    with pytest.raises(TopologyError, match="ALLOW or DENY"):
        topo.add_policy("p", action="REJECT")
    topo.add_policy("p", action="deny", rules=[{"ports": [80], "namespaces": "default"}])
    assert topo.policies["p"].rules[0].namespaces == ("default",)


def test_kube_proxy_rules_spread_over_endpoints() -> None:
    topo = plan(load_topology("two_nodes"))
    svc = topo.services["server"]
    rules = render_service_rules([(svc, service_endpoints(topo, svc))])
    assert (
        "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 8080 -m statistic --mode random "
        "--probability 0.50000 -j DNAT --to-destination 10.244.1.3:8080"
    ) in rules
    assert "--dport 8080 -j DNAT --to-destination 10.244.2.2:8080" in rules
