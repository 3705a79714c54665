"""What follows from a topology's waypoint declarations (testbed.cluster.waypoints), as
istiod derives it: which waypoint each workload and service uses (the `waypoint` fields of
the mesh config) and the routes and L7 policies each waypoint is given (its L7 file).

Attachment follows Istio's labels: an object's own `istio.io/use-waypoint` wins over its
namespace's, `none` opts out, `istio.io/use-waypoint-namespace` says where the waypoint
lives, and the waypoint's `istio.io/waypoint-for` says which traffic it takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from testbed.cluster.model import Topology
from testbed.cluster.waypoints import (
    OPT_OUT,
    USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE,
    Kind,
    L7Declarations,
    WaypointError,
    WaypointSpec,
)
from testbed.mesh.appprotocol import AppProtocol
from testbed.mesh.config import GatewayAddress, LocalConfig, NetworkAddress, Service, Workload
from testbed.mesh.waypoint import HBONE_PORT
from testbed.mesh.waypoint.config import WaypointConfig


@dataclass(frozen=True)
class ObjectLabels:
    """What attachment looks at for one workload or service of the mesh config."""

    labels: Mapping[str, str]
    namespace: str
    is_waypoint: bool = False


def waypoint_of(
    decls: L7Declarations, labels: Mapping[str, str], namespace: str, kind: Kind
) -> WaypointSpec | None:
    """The waypoint an object with `labels` in `namespace` uses for `kind` traffic."""
    namespace_labels = decls.namespace_labels.get(namespace, {})
    own = USE_WAYPOINT in labels
    name = labels[USE_WAYPOINT] if own else namespace_labels.get(USE_WAYPOINT)
    if not name or name == OPT_OUT:
        return None
    source = labels if own else namespace_labels
    key = f"{source.get(USE_WAYPOINT_NAMESPACE, namespace)}/{name}"
    spec = decls.waypoints.get(key)
    if spec is None:
        raise WaypointError(f"{USE_WAYPOINT}={name!r} in {namespace!r}: no waypoint {key!r}")
    return spec if spec.serves(kind) else None


def gateway_address(waypoint_ip: str) -> GatewayAddress:
    return GatewayAddress(destination=NetworkAddress.parse(f"/{waypoint_ip}"))


def attach(
    config: LocalConfig,
    decls: L7Declarations,
    workloads: Mapping[str, ObjectLabels],
    services: Mapping[str, ObjectLabels],
    waypoint_ips: Mapping[str, str],
) -> LocalConfig:
    """`config` with the `waypoint` of every workload (by uid) and service (by
    "<ns>/<hostname>") that uses one; `waypoint_ips` maps waypoint keys to pod IPs."""

    def address(labels: ObjectLabels | None, kind: Kind) -> GatewayAddress | None:
        if labels is None or labels.is_waypoint:
            return None
        spec = waypoint_of(decls, labels.labels, labels.namespace, kind)
        return None if spec is None else gateway_address(waypoint_ips[spec.key])

    new_workloads: list[Workload] = [
        w.model_copy(update={"waypoint": address(workloads.get(w.uid), "workload")})
        for w in config.workloads
    ]
    new_services: list[Service] = [
        s.model_copy(update={"waypoint": address(services.get(s.key), "service")})
        for s in config.services
    ]
    return LocalConfig(workloads=new_workloads, services=new_services, policies=config.policies)


def l7_config_for(
    spec: WaypointSpec,
    config: LocalConfig,
    decls: L7Declarations,
    app_protocols: Mapping[str, Mapping[int, AppProtocol]] | None = None,
) -> WaypointConfig:
    """The routes, policies and declared port protocols (`app_protocols`, by service key:
    app_protocols_of) one waypoint needs: those of the services it serves."""
    waypoint_ip = _waypoint_ip(spec, config)
    served = {
        s.key
        for s in config.services
        if s.waypoint is not None and config.waypoint_for_service(s) == (waypoint_ip, HBONE_PORT)
    }
    routes = [r for r in decls.routes if served.intersection(r.parents)]
    policies = [
        p
        for p in decls.policies
        if served.intersection(p.targets) or (not p.targets and p.namespace == spec.namespace)
    ]
    declared = {k: dict(v) for k, v in (app_protocols or {}).items() if k in served}
    return WaypointConfig(routes=routes, policies=policies, app_protocols=declared)


def app_protocols_of(topology: Topology) -> dict[str, dict[int, AppProtocol]]:
    """Every service's declared port protocols (appProtocol), by "<ns>/<hostname>"."""
    return {
        f"{svc.namespace}/{svc.hostname}": dict(svc.app_protocols)
        for svc in topology.services.values()
        if svc.app_protocols
    }


def _waypoint_ip(spec: WaypointSpec, config: LocalConfig) -> str:
    for workload in config.workloads:
        if workload.namespace == spec.namespace and workload.name == spec.name:
            return str(workload.workload_ips[0])
    raise WaypointError(f"waypoint {spec.key} has no pod in the mesh config")


def topology_labels(
    topology: Topology,
) -> tuple[dict[str, ObjectLabels], dict[str, ObjectLabels], dict[str, str]]:
    """(workloads by uid, services by key, waypoint pod IPs by key) of a planned topology."""
    waypoint_pods = set(topology.l7.waypoints)  # "<ns>/<name>", the waypoint's pod too
    workloads = {
        pod.uid: ObjectLabels(
            pod.labels, pod.namespace, f"{pod.namespace}/{pod.name}" in waypoint_pods
        )
        for pod in topology.pods.values()
    }
    services = {
        f"{svc.namespace}/{svc.hostname}": ObjectLabels(svc.labels, svc.namespace)
        for svc in topology.services.values()
    }
    ips = {
        f"{pod.namespace}/{pod.name}": pod.ip
        for pod in topology.pods.values()
        if f"{pod.namespace}/{pod.name}" in waypoint_pods
    }
    return workloads, services, ips


def attach_topology(config: LocalConfig, topology: Topology) -> LocalConfig:
    """The mesh config with the waypoints the topology's labels ask for."""
    if not topology.l7.waypoints:
        return config
    workloads, services, ips = topology_labels(topology)
    try:
        return attach(config, topology.l7, workloads, services, ips)
    except WaypointError as exc:
        raise topology.error(str(exc)) from None
