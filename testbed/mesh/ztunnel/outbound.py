"""Outbound (15001): a connection the pod's app made, captured by the pod's rules.

Recover where it was going, resolve a service VIP to an endpoint, then either tunnel it over
HBONE to the destination pod's 15008 (destination in the mesh) or to the waypoint that
serves the destination, with the source pod's certificate, or pass it through as plain TCP.
Upstream sockets are opened inside the source pod's namespace with mark 0x539, so its rules
do not capture them again.
"""

from __future__ import annotations

import logging
import secrets
import socket

from testbed.mesh.config import Workload
from testbed.mesh.hbone import HboneError, connect_tcp, relay_tcp, reset_socket
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.waypoint.via import ViaWaypoint, waypoint_route
from testbed.mesh.ztunnel import OUTBOUND_PORT, ZTUNNEL_PORTS
from testbed.mesh.ztunnel.netio import Address, ByteMeter, destination_of
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.state import Route
from testbed.mesh.ztunnel.telemetry import record_close, traffic_labels

log = logging.getLogger(__name__)


async def serve_outbound(pod: PodProxy, client: socket.socket, peer: Address) -> None:
    destination = destination_of(client, OUTBOUND_PORT)
    via = waypoint_route(pod.mesh.config, *destination)
    if via is not None and destination[1] not in ZTUNNEL_PORTS:
        await _via_waypoint(pod, client, peer, via)
        return
    route = pod.mesh.route(*destination)
    if destination[1] in ZTUNNEL_PORTS or route is None:
        log.info("outbound %s -> %s refused", format_address(peer), format_address(destination))
        reset_socket(client)
        return
    source = pod.workload
    labels = traffic_labels(
        "source",
        source=source,
        source_principal=source.identity.uri,
        destination=route.workload,
        service=route.service,
        mutual_tls=route.in_mesh,
    )
    connection = pod.mesh.metrics.connection(labels)
    with ByteMeter(client) as meter:
        flags = "-"
        try:
            if route.in_mesh:
                await _tunnel(pod, client, peer, route)
            else:
                await _passthrough(pod, client, route.target)
        except (HboneError, OSError) as exc:
            log.info("outbound %s -> %s failed: %s", format_address(peer), route.target, exc)
            flags = "CONNECT"
            reset_socket(client)
        record_close(connection, meter, flags)


def tracing_headers(source: Workload) -> dict[str, str]:
    """The `baggage` (who is calling) and a fresh W3C `traceparent`, as ztunnel sends them."""
    baggage = (
        f"k8s.cluster.name={source.cluster_id or 'Kubernetes'},"
        f"k8s.namespace.name={source.namespace},k8s.pod.name={source.name},"
        f"service.name={source.canonical_name or source.name},"
        f"service.version={source.canonical_revision or 'latest'}"
    )
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"
    return {"baggage": baggage, "traceparent": traceparent}


async def _tunnel(pod: PodProxy, client: socket.socket, peer: Address, route: Route) -> None:
    """HBONE to the hop (`<pod ip>:15008`, or a waypoint), CONNECT to the target."""
    assert route.via is not None
    source_identity = pod.workload.identity
    stream = await pod.hbone_client.open(
        route.via.address,
        format_address(route.target),
        ssl_context=pod.mesh.certs.client_context(source_identity),
        expected_identities=route.via.identities,
        source_identity=source_identity.uri,
        source=peer,
        headers=tracing_headers(pod.workload),
    )
    await stream.relay(client)


async def _via_waypoint(
    pod: PodProxy, client: socket.socket, peer: Address, via: ViaWaypoint
) -> None:
    """HBONE to the destination's waypoint, CONNECT to the original VIP:port (or pod ip:port);
    the waypoint picks the endpoint."""
    source_identity = pod.workload.identity
    try:
        stream = await pod.hbone_client.open(
            via.address,
            via.authority,
            ssl_context=pod.mesh.certs.client_context(source_identity),
            expected_identities=via.identities,
            source_identity=source_identity.uri,
            source=peer,
            headers=tracing_headers(pod.workload),
        )
    except (HboneError, OSError) as exc:
        log.info(
            "outbound %s -> %s via waypoint failed: %s", format_address(peer), via.authority, exc
        )
        reset_socket(client)
        return
    await stream.relay(client)


async def _passthrough(pod: PodProxy, client: socket.socket, address: Address) -> None:
    upstream = await connect_tcp(address, socket_factory=pod.upstream_socket)
    await relay_tcp(client, upstream)
