"""Waypoints declared in topology scripts end up in the mesh config and the L7 files."""

from __future__ import annotations

import pytest

from testbed.cluster.model import Topology, TopologyError, plan
from testbed.cluster.waypoints import USE_WAYPOINT, WAYPOINT_FOR
from testbed.redirect.control import mesh_config
from testbed.redirect.waypoint_config import l7_config_for


class Shop(Topology):
    name = "shop"

    def build(self) -> None:
        self.add_node("n1")
        self.label_namespace("default", {USE_WAYPOINT: "wp"})
        self.add_waypoint("wp", "n1")
        self.add_pod("web", "n1", labels={"app": "web"})
        self.add_pod("web-v2", "n1", service_account="web", labels={"app": "web", "v": "2"})
        self.add_pod("db", "n1", labels={"app": "db", USE_WAYPOINT: "wp"})
        self.add_service("web", selector={"app": "web"}, ports=[80])
        self.add_service("web-v2", selector={"v": "2"}, ports=[80])
        self.add_service("db", selector={"app": "db"}, ports=[5432], labels={USE_WAYPOINT: "none"})
        mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": {"service": "db"}}}
        self.add_http_route(
            "web",
            services=["web"],
            rules=[{"backends": [{"service": "web-v2", "weight": 1}], "filters": [mirror]}],
        )
        self.add_l7_policy("no-delete", action="deny", services=["web"],
                           rules=[{"to": [{"methods": ["DELETE"]}]}])  # fmt: skip


def test_declared_waypoint_is_an_uncaptured_pod_with_its_own_identity() -> None:
    topology = plan(Shop())
    pod = topology.pods["wp"]
    assert pod.service_account == "wp"
    assert pod.labels["istio.io/dataplane-mode"] == "none"
    assert pod.labels[WAYPOINT_FOR] == "service"


def test_mesh_config_and_l7_file_follow_the_labels() -> None:
    topology = plan(Shop())
    config = mesh_config(topology)
    waypoint = (topology.pods["wp"].ip, 15008)
    by_name = {s.name: config.waypoint_for_service(s) for s in config.services}
    assert by_name == {"web": waypoint, "web-v2": waypoint, "db": None}
    assert all(w.waypoint is None for w in config.workloads)  # waypoint-for: service
    l7 = l7_config_for(topology.l7.waypoints["default/wp"], config, topology.l7)
    assert [r.name for r in l7.routes] == ["web"]
    backend = l7.routes[0].rules[0].backends[0]
    assert backend.service == "default/web-v2.default.svc.cluster.local"
    mirror = l7.routes[0].rules[0].filters[0].request_mirror
    assert mirror is not None
    assert mirror.backend_ref.service == "default/db.default.svc.cluster.local"
    assert [(p.name, p.action) for p in l7.policies] == [("no-delete", "DENY")]


def test_routes_must_name_known_services() -> None:
    class Broken(Topology):
        def build(self) -> None:
            self.add_node("n1")
            self.add_http_route("r", services=["nope"], rules=[])

    with pytest.raises(TopologyError, match="unknown service 'nope'"):
        plan(Broken())
