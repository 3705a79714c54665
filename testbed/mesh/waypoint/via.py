"""Which connections a source ztunnel sends through a waypoint, and how (socket-free).

A connection to a service VIP:port goes via the service's waypoint; one to a pod IP via the
workload's waypoint. The HBONE goes to the waypoint's address (its pod IP, port 15008),
expecting the waypoint's identity, with the original destination as the CONNECT target.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.mesh.config import LocalConfig
from testbed.mesh.waypoint import HBONE_PORT

Address = tuple[str, int]


@dataclass(frozen=True)
class ViaWaypoint:
    address: Address  # the waypoint's HBONE address
    identities: frozenset[str]  # SPIFFE URIs the waypoint may present
    authority: str  # the original destination, "ip:port"


def waypoint_route(config: LocalConfig, ip: str, port: int) -> ViaWaypoint | None:
    service = config.service_by_vip(ip, port)
    if service is not None:
        address = config.waypoint_for_service(service)
    else:
        workload = config.workload_by_ip(ip)
        address = None if workload is None else config.waypoint_for_workload(workload)
    if address is None:
        return None
    authority = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return ViaWaypoint(address, _identities(config, address[0]), authority)


def _identities(config: LocalConfig, waypoint_ip: str) -> frozenset[str]:
    workload = config.workload_by_ip(waypoint_ip)
    if workload is not None:
        return frozenset({workload.identity.uri})
    # A waypoint named by its service: any identity its endpoints may have.
    service = config.service_by_vip(waypoint_ip, HBONE_PORT)
    if service is None:
        return frozenset()
    return frozenset(w.identity.uri for w, _ in config.endpoints(service, HBONE_PORT))
