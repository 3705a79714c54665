"""The ztunnel's outbound decision (pure): refuse, via waypoint, HBONE or passthrough; and
the waypoint checks that use the same resolution (who is the waypoint, did it send this)."""

from __future__ import annotations

from typing import Any

from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.waypoint.via import ViaWaypoint, from_waypoint
from testbed.mesh.ztunnel.route import (
    DirectLocal,
    Hbone,
    Passthrough,
    Refuse,
    ToWaypoint,
    decide_outbound,
)

WAYPOINT_IP = "10.244.9.2"
WAYPOINT_URI = "spiffe://cluster.local/ns/default/sa/waypoint"
WEB_VIP, BOUND_VIP, EMPTY_VIP, SVC_WP_VIP = "10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4"
LOST_VIP = "10.96.0.5"
FAR_IP = "10.244.2.2"
IPS = {"client": "10.244.1.2", "web": "10.244.1.3", "bound": "10.244.1.4", "old": "10.244.1.5"}


NODE, OTHER_NODE = "node1", "node2"


def _workload(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "uid": f"default-{name}",
        "name": name,
        "namespace": "default",
        "serviceAccount": name,
        "workloadIps": [IPS.get(name, WAYPOINT_IP)],
        "protocol": "HBONE",
        "node": NODE,
        **extra,
    }


def _service(name: str, vip: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": "default",
        "hostname": f"{name}.default.svc.cluster.local",
        "vips": [f"/{vip}"],
        "ports": {80: 8080},
        **extra,
    }


def config() -> LocalConfig:
    waypoint = {"destination": f"/{WAYPOINT_IP}", "hboneMtlsPort": 15008}
    member = "default/{}.default.svc.cluster.local"
    return LocalConfig.model_validate(
        {
            "workloads": [
                _workload("client"),
                _workload("waypoint"),
                _workload("web", services={member.format("web"): {80: 8080}}),
                _workload(
                    "bound", waypoint=waypoint, services={member.format("bound"): {80: 8080}}
                ),
                _workload("old", protocol="TCP"),
                _workload("far", workloadIps=[FAR_IP], node=OTHER_NODE),
            ],
            "services": [
                _service("web", WEB_VIP),
                _service("bound", BOUND_VIP),
                _service("empty", EMPTY_VIP),
                _service("fronted", SVC_WP_VIP, waypoint=waypoint),
                _service("lost", LOST_VIP, waypoint={"destination": "default/gone.example"}),
            ],
        }
    )


def first(config: LocalConfig) -> Any:
    def pick(service: Service, port: int) -> tuple[Workload, int] | None:
        endpoints = config.endpoints(service, port)
        return endpoints[0] if endpoints else None

    return pick


def decide(ip: str, port: int) -> Any:
    mesh = config()
    return decide_outbound(mesh, (ip, port), first(mesh))


def test_ztunnel_ports_are_refused_whatever_the_address() -> None:
    for port in (15001, 15006, 15008):
        assert isinstance(decide(IPS["web"], port), Refuse)


def test_service_vip_goes_over_hbone_to_an_endpoint_with_its_target_port() -> None:
    decision = decide(WEB_VIP, 80)
    assert isinstance(decision, Hbone)
    assert decision.hop == (IPS["web"], 15008) and decision.target == (IPS["web"], 8080)
    assert decision.identity == "spiffe://cluster.local/ns/default/sa/web"
    assert decision.service is not None and decision.service.name == "web"


def test_service_without_endpoints_is_refused() -> None:
    decision = decide(EMPTY_VIP, 80)
    assert isinstance(decision, Refuse) and "no healthy endpoint" in decision.reason


def test_unknown_and_uncaptured_destinations_pass_through() -> None:
    outside = decide("192.0.2.1", 443)
    assert outside == Passthrough(("192.0.2.1", 443), None, None)
    old = decide(IPS["old"], 5000)
    assert isinstance(old, Passthrough) and old.workload is not None
    assert old.target == (IPS["old"], 5000)


def test_pod_ip_of_a_mesh_workload_goes_straight_over_hbone() -> None:
    decision = decide(IPS["web"], 8080)
    assert isinstance(decision, Hbone) and decision.target == (IPS["web"], 8080)
    assert decision.service is None


def test_waypoint_bound_destinations_go_via_the_waypoint_keeping_their_target() -> None:
    via = ViaWaypoint((WAYPOINT_IP, 15008), frozenset({WAYPOINT_URI}), f"{SVC_WP_VIP}:80")
    service_bound = decide(SVC_WP_VIP, 80)
    assert isinstance(service_bound, ToWaypoint) and service_bound.via == via
    assert service_bound.workload is None and service_bound.service is not None
    pod_bound = decide(IPS["bound"], 8080)
    assert isinstance(pod_bound, ToWaypoint)
    assert pod_bound.via.authority == f"{IPS['bound']}:8080"
    # a VIP without a waypoint whose picked endpoint has one: via it, to the endpoint
    endpoint_bound = decide(BOUND_VIP, 80)
    assert isinstance(endpoint_bound, ToWaypoint)
    assert endpoint_bound.via.authority == f"{IPS['bound']}:8080"
    assert endpoint_bound.workload is not None and endpoint_bound.workload.name == "bound"


def test_only_the_bound_waypoint_identity_from_its_address_counts_as_the_waypoint() -> None:
    mesh = config()
    bound = mesh.workload_by_uid("default-bound")
    web = mesh.workload_by_uid("default-web")
    assert bound is not None and web is not None
    assert from_waypoint(mesh, bound, WAYPOINT_URI, WAYPOINT_IP)
    client_uri = "spiffe://cluster.local/ns/default/sa/client"
    assert not from_waypoint(mesh, bound, client_uri, IPS["client"])  # the bypass
    assert not from_waypoint(mesh, bound, WAYPOINT_URI, IPS["client"])  # right name, wrong IP
    assert not from_waypoint(mesh, bound, None, WAYPOINT_IP)
    assert not from_waypoint(mesh, web, WAYPOINT_URI, WAYPOINT_IP)  # web has no waypoint


def test_a_destination_bound_to_an_unreachable_waypoint_is_refused_not_sent_around_it() -> None:
    decision = decide(LOST_VIP, 80)
    assert isinstance(decision, Refuse) and "gone.example" in decision.reason


# ------------------------------------------------------------ the same-node fast path


def decide_on(node: str | None, ip: str, port: int) -> Any:
    mesh = config()
    return decide_outbound(mesh, (ip, port), first(mesh), local_node=node)


def test_a_workload_of_the_own_node_is_served_in_process_when_asked() -> None:
    by_ip = decide_on(NODE, IPS["web"], 8080)
    assert isinstance(by_ip, DirectLocal)
    assert by_ip.target == (IPS["web"], 8080) and by_ip.workload.name == "web"
    by_vip = decide_on(NODE, WEB_VIP, 80)
    assert isinstance(by_vip, DirectLocal) and by_vip.target == (IPS["web"], 8080)
    assert by_vip.service is not None and by_vip.service.name == "web"


def test_without_the_fast_path_the_same_node_goes_over_hbone() -> None:
    assert isinstance(decide_on(None, IPS["web"], 8080), Hbone)


def test_the_fast_path_is_for_the_own_node_mesh_workloads_without_a_waypoint_only() -> None:
    assert isinstance(decide_on(NODE, FAR_IP, 8080), Hbone)  # another node's
    assert isinstance(decide_on(NODE, IPS["old"], 5000), Passthrough)  # not in the mesh
    assert isinstance(decide_on(NODE, IPS["bound"], 8080), ToWaypoint)  # its waypoint first
    assert isinstance(decide_on(NODE, BOUND_VIP, 80), ToWaypoint)
    assert isinstance(decide_on(NODE, IPS["web"], 15008), Refuse)
