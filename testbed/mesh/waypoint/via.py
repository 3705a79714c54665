"""Waypoint resolution, in one place (socket-free): which waypoint serves a destination,
where its HBONE listener is, which identities it presents, and whether a connection came
from it.

A connection to a service VIP:port goes via the service's waypoint; one to a pod IP via the
workload's waypoint. The HBONE goes to the waypoint's address (its pod IP, or its service's
VIP, port 15008), expecting the waypoint's identity, with the original destination as the
CONNECT target. A destination bound to a waypoint accepts HBONE only from that waypoint:
as Istio's ztunnel checks it, the source identity must be a waypoint workload's identity and
the TCP peer one of that workload's addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.mesh.config import GatewayAddress, LocalConfig, NetworkAddress, Workload

Address = tuple[str, int]


@dataclass(frozen=True)
class ViaWaypoint:
    address: Address  # the waypoint's HBONE address
    identities: frozenset[str]  # SPIFFE URIs the waypoint may present
    authority: str  # the original destination, "ip:port"


def waypoint_members(config: LocalConfig, gateway: GatewayAddress) -> list[Workload]:
    """The workloads that make up a waypoint: the one at its address, or its service's
    endpoints."""
    destination = gateway.destination
    if isinstance(destination, NetworkAddress):
        workload = config.workload_by_ip(str(destination.address))
        return [] if workload is None else [workload]
    service = config.service_by_host(destination)
    if service is None:
        return []
    return [w for w, _ in config.endpoints(service, gateway.hbone_mtls_port)]


def destination_waypoint(config: LocalConfig, ip: str, port: int) -> GatewayAddress | None:
    """The waypoint bound to what `ip:port` names: a service VIP's, else a workload's."""
    service = config.service_by_vip(ip, port)
    if service is not None:
        return service.waypoint
    workload = config.workload_by_ip(ip)
    return None if workload is None else workload.waypoint


def via_waypoint(config: LocalConfig, gateway: GatewayAddress, ip: str, port: int) -> ViaWaypoint:
    """How to reach `gateway` for a connection to `ip:port` (raises LookupError when the
    waypoint's hostname names no service with a VIP)."""
    address = config.waypoint_address(gateway)
    if address is None:
        raise LookupError(f"waypoint {gateway.destination} has no address")
    identities = frozenset(w.identity.uri for w in waypoint_members(config, gateway))
    authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return ViaWaypoint(address, identities, authority)


def waypoint_route(config: LocalConfig, ip: str, port: int) -> ViaWaypoint | None:
    """The waypoint hop for a connection to `ip:port`, None when no waypoint is bound to it
    (LookupError when one is bound but has no address: such traffic must not skip it)."""
    gateway = destination_waypoint(config, ip, port)
    return None if gateway is None else via_waypoint(config, gateway, ip, port)


def from_waypoint(
    config: LocalConfig, workload: Workload, peer_identity: str | None, peer_ip: str
) -> bool:
    """Whether a connection to `workload` came from the waypoint it is bound to."""
    if workload.waypoint is None or peer_identity is None:
        return False
    return any(
        member.identity.uri == peer_identity
        and any(str(ip) == peer_ip for ip in member.workload_ips)
        for member in waypoint_members(config, workload.waypoint)
    )
