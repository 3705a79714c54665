"""The ztunnel's outbound decision, as a pure function of the mesh config and the original
destination (docs/architecture.md): refuse it, send it via a waypoint, tunnel it over HBONE to
the destination pod, or pass it through as plain TCP.

    ztunnel port (15001/15006/15008)       -> Refuse (it would loop)
    VIP or pod bound to a waypoint         -> ToWaypoint (CONNECT target: the original ip:port)
    ... whose address is unknown           -> Refuse
    service VIP, no healthy endpoint       -> Refuse
    service VIP -> endpoint with waypoint  -> ToWaypoint (target: the endpoint's ip:port)
    mesh workload on `local_node`          -> DirectLocal (same-node fast path, asked for)
    mesh workload (protocol HBONE)         -> Hbone to <pod ip>:15008
    anything else                          -> Passthrough

DirectLocal is Istio 1.20's shared-mode ztunnel fast path (RequestType::DirectLocal): a
destination workload on the ztunnel's own node, with no waypoint, is handed to the inbound
side in the same process (its L4 policy still applies) with no TLS and no HBONE. A caller
that serves one node from a shared ztunnel passes that node as `local_node` to take it.

Round-robin over a service's endpoints is state, so the caller passes `pick`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.waypoint.via import ViaWaypoint, via_waypoint, waypoint_route
from testbed.mesh.ztunnel import HBONE_PORT, ZTUNNEL_PORTS

Address = tuple[str, int]
Pick = Callable[[Service, int], tuple[Workload, int] | None]


@dataclass(frozen=True)
class Refuse:
    reason: str


@dataclass(frozen=True)
class Passthrough:
    target: Address
    workload: Workload | None  # the destination, if the mesh knows it (out of the mesh)
    service: Service | None = None


@dataclass(frozen=True)
class Hbone:
    hop: Address  # <pod ip>:15008
    identity: str  # the destination pod's SPIFFE URI
    target: Address  # the CONNECT authority, <pod ip>:<target port>
    workload: Workload
    service: Service | None = None


@dataclass(frozen=True)
class ToWaypoint:
    via: ViaWaypoint
    workload: Workload | None  # None when a service waypoint picks the endpoint
    service: Service | None = None


@dataclass(frozen=True)
class DirectLocal:
    target: Address  # <pod ip>:<target port>, a workload of this ztunnel's own node
    workload: Workload
    service: Service | None = None


Outbound = Refuse | ToWaypoint | DirectLocal | Hbone | Passthrough


def decide_outbound(
    config: LocalConfig, destination: Address, pick: Pick, local_node: str | None = None
) -> Outbound:
    ip, port = destination
    if port in ZTUNNEL_PORTS:
        return Refuse(f"port {port} is ztunnel's own")
    service = config.service_by_vip(ip, port)
    try:
        via = waypoint_route(config, ip, port)
    except LookupError as exc:  # bound to a waypoint nobody can reach: never around it
        return Refuse(str(exc))
    if via is not None:
        workload = None if service is not None else config.workload_by_ip(ip)
        return ToWaypoint(via, workload, service)
    if service is None:
        return _to_workload(config.workload_by_ip(ip), destination, None, local_node)
    picked = pick(service, port)
    if picked is None:
        return Refuse(f"service {service.hostname}:{port} has no healthy endpoint")
    workload, target_port = picked
    target = (str(workload.workload_ips[0]), target_port)
    if workload.waypoint is not None:
        try:
            via = via_waypoint(config, workload.waypoint, *target)
        except LookupError as exc:
            return Refuse(str(exc))
        return ToWaypoint(via, workload, service)
    return _to_workload(workload, target, service, local_node)


def _to_workload(
    workload: Workload | None, target: Address, service: Service | None, local_node: str | None
) -> Outbound:
    if workload is None or workload.protocol != "HBONE":
        return Passthrough(target, workload, service)
    if local_node is not None and workload.node == local_node:
        return DirectLocal(target, workload, service)
    hop = (str(workload.workload_ips[0]), HBONE_PORT)
    return Hbone(hop, workload.identity.uri, target, workload, service)
