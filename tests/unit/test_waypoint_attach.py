"""Waypoint attachment (pure): Istio's use-waypoint / waypoint-for labels -> mesh config."""

from __future__ import annotations

import pytest

from testbed.cluster.waypoints import (
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    L7Declarations,
    WaypointError,
    WaypointSpec,
)
from testbed.mesh.config import LocalConfig
from testbed.mesh.waypoint.via import ViaWaypoint, waypoint_route
from testbed.redirect.waypoint_config import ObjectLabels, attach, l7_config_for

WAYPOINT_IP = "10.244.3.2"
OTHER_WAYPOINT_IP = "10.244.3.3"


def config() -> LocalConfig:
    def workload(name: str, ip: str, namespace: str = "default") -> dict[str, object]:
        return {"uid": f"{namespace}-{name}", "name": name, "namespace": namespace,
                "workloadIps": [ip], "protocol": "HBONE"}  # fmt: skip

    def service(name: str, vip: str, namespace: str = "default") -> dict[str, object]:
        return {"name": name, "namespace": namespace, "vips": [f"/{vip}"], "ports": {80: 80},
                "hostname": f"{name}.{namespace}.svc.cluster.local"}  # fmt: skip

    return LocalConfig.model_validate(
        {
            "workloads": [
                workload("wp", WAYPOINT_IP),
                workload("wp-all", OTHER_WAYPOINT_IP, "shared"),
                workload("app", "10.244.1.2"),
                workload("pinned", "10.244.1.3"),
                workload("opted-out", "10.244.1.4"),
            ],
            "services": [
                service("app", "10.96.0.10"),
                service("quiet", "10.96.0.11"),
                service("shared-user", "10.96.0.12"),
            ],
        }
    )


def declarations() -> L7Declarations:
    decls = L7Declarations(namespace_labels={"default": {USE_WAYPOINT: "wp"}})
    decls.add_waypoint(WaypointSpec("wp", "default", "node1"))  # waypoint-for: service
    decls.add_waypoint(WaypointSpec("wp-all", "shared", "node1", "all"))
    return decls


WORKLOADS = {
    "default-wp": ObjectLabels({}, "default", is_waypoint=True),
    "shared-wp-all": ObjectLabels({}, "shared", is_waypoint=True),
    "default-app": ObjectLabels({}, "default"),
    "default-pinned": ObjectLabels(
        {USE_WAYPOINT: "wp-all", USE_WAYPOINT_NAMESPACE: "shared"}, "default"
    ),
    "default-opted-out": ObjectLabels({USE_WAYPOINT: "none"}, "default"),
}
SERVICES = {
    "default/app.default.svc.cluster.local": ObjectLabels({}, "default"),
    "default/quiet.default.svc.cluster.local": ObjectLabels({USE_WAYPOINT: "none"}, "default"),
    "default/shared-user.default.svc.cluster.local": ObjectLabels(
        {USE_WAYPOINT: "wp-all", USE_WAYPOINT_NAMESPACE: "shared"}, "default"
    ),
}
IPS = {"default/wp": WAYPOINT_IP, "shared/wp-all": OTHER_WAYPOINT_IP}


def waypoints_of(attached: LocalConfig) -> dict[str, tuple[str, int] | None]:
    found = {w.uid: attached.waypoint_for_workload(w) for w in attached.workloads}
    found.update({s.name: attached.waypoint_for_service(s) for s in attached.services})
    return found


def test_namespace_label_service_label_pod_label_and_opt_out() -> None:
    attached = attach(config(), declarations(), WORKLOADS, SERVICES, IPS)
    assert waypoints_of(attached) == {
        "default-wp": None,  # a waypoint never uses one
        "shared-wp-all": None,
        "default-app": None,  # namespace waypoint is for services only
        "default-pinned": (OTHER_WAYPOINT_IP, 15008),  # pod label, cross-namespace
        "default-opted-out": None,
        "app": (WAYPOINT_IP, 15008),  # from the namespace label
        "quiet": None,  # opted out
        "shared-user": (OTHER_WAYPOINT_IP, 15008),
    }


def test_waypoint_for_workload_attaches_pods_not_services() -> None:
    decls = L7Declarations(namespace_labels={"default": {USE_WAYPOINT: "wp"}})
    decls.add_waypoint(WaypointSpec("wp", "default", "node1", "workload"))
    decls.add_waypoint(WaypointSpec("wp-all", "shared", "node1", "none"))
    attached = attach(config(), decls, WORKLOADS, {}, IPS)
    found = waypoints_of(attached)
    assert found["default-app"] == (WAYPOINT_IP, 15008)
    assert found["app"] is None
    assert found["default-pinned"] is None  # its waypoint is for nothing


def test_unknown_waypoint_name_is_an_error() -> None:
    decls = L7Declarations(namespace_labels={"default": {USE_WAYPOINT: "nope"}})
    with pytest.raises(WaypointError, match="no waypoint 'default/nope'"):
        attach(config(), decls, WORKLOADS, SERVICES, IPS)


def test_bad_declarations_are_rejected() -> None:
    decls = declarations()
    with pytest.raises(WaypointError, match="waypoint_for"):
        decls.add_waypoint(WaypointSpec("x", "default", "node1", "everything"))  # type: ignore[arg-type]
    with pytest.raises(WaypointError, match="duplicate"):
        decls.add_waypoint(WaypointSpec("wp", "default", "node1"))
    with pytest.raises(WaypointError, match="route 'r'"):
        decls.add_route("r", "default", ["default/app"], [{"timeout": -1}])


def test_each_waypoint_gets_the_routes_and_policies_of_its_services() -> None:
    decls = declarations()
    app, shared = (
        "default/app.default.svc.cluster.local",
        "default/shared-user.default.svc.cluster.local",
    )
    decls.add_route("to-app", "default", [app], [{}])
    decls.add_route("to-shared", "default", [shared], [{}])
    decls.add_policy({"name": "app-only", "namespace": "default", "targets": [app]})
    decls.add_policy({"name": "whole-ns", "namespace": "default"})
    attached = attach(config(), decls, WORKLOADS, SERVICES, IPS)
    mine = l7_config_for(decls.waypoints["default/wp"], attached, decls)
    assert [r.name for r in mine.routes] == ["to-app"]
    assert [p.name for p in mine.policies] == ["app-only", "whole-ns"]
    theirs = l7_config_for(decls.waypoints["shared/wp-all"], attached, decls)
    assert [r.name for r in theirs.routes] == ["to-shared"]
    assert theirs.policies == []


def test_source_ztunnel_sends_attached_destinations_via_their_waypoint() -> None:
    attached = attach(config(), declarations(), WORKLOADS, SERVICES, IPS)
    via = waypoint_route(attached, "10.96.0.10", 80)
    assert via == ViaWaypoint(
        (WAYPOINT_IP, 15008),
        frozenset({"spiffe://cluster.local/ns/default/sa/default"}),
        "10.96.0.10:80",
    )
    pinned = waypoint_route(attached, "10.244.1.3", 8080)
    assert pinned is not None and pinned.address == (OTHER_WAYPOINT_IP, 15008)
    assert pinned.authority == "10.244.1.3:8080"
    assert waypoint_route(attached, "10.96.0.11", 80) is None  # opted out
    assert waypoint_route(attached, "10.244.1.2", 80) is None  # pod, waypoint for services
    assert waypoint_route(attached, "10.9.9.9", 80) is None  # outside the mesh
