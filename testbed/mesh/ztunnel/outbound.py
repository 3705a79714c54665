"""Outbound (15001): a connection the pod's app made, captured by the pod's rules.

Recover where it was going, decide (testbed.mesh.ztunnel.route), then tunnel it over HBONE
to the destination pod's 15008 or to the waypoint that serves the destination, with the
source pod's certificate, hand it to the inbound side in-process (a shared ztunnel's
same-node fast path, testbed.mesh.ztunnel.local), or pass it through as plain TCP. Upstream
sockets are opened inside the source pod's namespace with mark 0x539, so its rules do not
capture them again.
"""

from __future__ import annotations

import logging
import secrets
import socket

from testbed.mesh.config import Service, Workload
from testbed.mesh.hbone import HboneError, connect_tcp, relay_tcp, reset_socket
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.proxy.connections import ConnectionRecord
from testbed.mesh.proxy.connections import Path as RecordPath
from testbed.mesh.ztunnel import OUTBOUND_PORT, local
from testbed.mesh.ztunnel.netio import Address, ByteMeter, destination_of
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.route import (
    DirectLocal,
    Hbone,
    Outbound,
    Passthrough,
    Refuse,
    ToWaypoint,
    decide_outbound,
)
from testbed.mesh.ztunnel.telemetry import record_close, traffic_labels

log = logging.getLogger(__name__)


async def serve_outbound(pod: PodProxy, client: socket.socket, peer: Address) -> None:
    destination = destination_of(client, OUTBOUND_PORT)
    local_node = pod.mesh.node if pod.local_pod is not None else None
    decision = decide_outbound(pod.mesh.config, destination, pod.mesh.pick, local_node)
    source = pod.workload
    record = _record(pod, peer, destination, decision)
    local_pod = None
    if isinstance(decision, DirectLocal):
        assert pod.local_pod is not None
        local_pod = pod.local_pod(decision.target[0])
        if local_pod is None:
            decision = Refuse(f"{decision.target[0]} is no workload of this node")
        elif local.denied(pod, local_pod, peer, decision, record):
            reset_socket(client)
            return
    if isinstance(decision, Refuse):
        log.info(
            "outbound %s -> %s refused: %s",
            format_address(peer),
            format_address(destination),
            decision.reason,
        )
        pod.mesh.connections.refuse(record, decision.reason)
        reset_socket(client)
        return
    labels = traffic_labels(
        "source",
        source=source,
        source_principal=source.identity.uri,
        destination=decision.workload,
        service=decision.service,
        mutual_tls=not isinstance(decision, Passthrough),
    )
    connection = pod.mesh.metrics.connection(labels)
    with ByteMeter(client) as meter:
        flags, error = "-", None
        try:
            if isinstance(decision, Passthrough):
                await _passthrough(pod, client, decision.target)
            elif isinstance(decision, DirectLocal):
                assert local_pod is not None
                await local.relay(pod, local_pod, client, peer, decision, record)
            elif isinstance(decision, Hbone):
                await _tunnel(
                    pod,
                    client,
                    peer,
                    decision.hop,
                    {decision.identity},
                    format_address(decision.target),
                    decision.service,
                )
            else:
                via = decision.via
                await _tunnel(
                    pod, client, peer, via.address, via.identities, via.authority, decision.service
                )
        except (HboneError, OSError) as exc:
            log.info("outbound %s -> %s failed: %s", format_address(peer), record.upstream, exc)
            flags, error = "CONNECT", str(exc)
            reset_socket(client)
        record_close(connection, meter, flags)
        sent, received = meter.counts()
    pod.mesh.connections.close(
        record, sent=sent, received=received, verdict="error" if error else None, reason=error
    )


def _record(
    pod: PodProxy, peer: Address, destination: Address, decision: Outbound
) -> ConnectionRecord:
    """The connection record of an outbound decision."""
    path: RecordPath = "passthrough"
    dst_identity, connect_target, upstream = None, None, None
    if isinstance(decision, Passthrough):
        upstream = decision.target
    elif isinstance(decision, Hbone):
        path, dst_identity, upstream = "hbone", decision.identity, decision.hop
        connect_target = format_address(decision.target)
    elif isinstance(decision, DirectLocal):
        path, dst_identity, upstream = "local", decision.workload.identity.uri, decision.target
    elif isinstance(decision, ToWaypoint):
        path, upstream, connect_target = "waypoint", decision.via.address, decision.via.authority
        dst_identity = next(iter(sorted(decision.via.identities)), None)
    return pod.mesh.connections.open(
        listener=OUTBOUND_PORT,
        direction="outbound",
        peer=peer,
        original_dst=destination,
        path=path,
        src_identity=pod.workload.identity.uri,
        dst_identity=dst_identity,
        connect_target=connect_target,
        upstream=upstream,
    )


def baggage(source: Workload) -> str:
    """Who is calling, as Istio's ztunnel writes it: fields it does not know are left out."""
    fields = (
        ("k8s.cluster.name", source.cluster_id or "Kubernetes"),
        ("k8s.namespace.name", source.namespace),
        (
            f"k8s.{(source.workload_type or 'pod').lower()}.name",
            source.workload_name or source.name,
        ),
        ("service.name", source.canonical_name),
        ("service.version", source.canonical_revision),
        ("cloud.region", source.locality.region),
        ("cloud.availability_zone", source.locality.zone),
    )
    return ",".join(f"{key}={value}" for key, value in fields if value)


def forwarded(peer: Address, service: Service | None) -> str:
    """`forwarded: for="ip:port"`, with `;host=<service hostname>` for service traffic."""
    value = f'for="{format_address(peer)}"'
    return f"{value};host={service.hostname}" if service is not None else value


def tracing_headers(source: Workload) -> dict[str, str]:
    """The `baggage` (who is calling) and a fresh W3C `traceparent`, as ztunnel sends them."""
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"
    return {"baggage": baggage(source), "traceparent": traceparent}


async def _tunnel(
    pod: PodProxy,
    client: socket.socket,
    peer: Address,
    hop: Address,
    identities: frozenset[str] | set[str],
    authority: str,
    service: Service | None,
) -> None:
    """HBONE to `hop` (`<pod ip>:15008`, or a waypoint), CONNECT to `authority`."""
    source_identity = pod.workload.identity
    headers = {"forwarded": forwarded(peer, service), **tracing_headers(pod.workload)}
    stream = await pod.hbone_client.open(
        hop,
        authority,
        ssl_context=pod.mesh.certs.client_context(source_identity),
        expected_identities=identities,
        source_identity=source_identity.uri,
        headers=headers,
    )
    stats = await stream.relay(client)
    if stats.error is not None:  # the tunnel died under the stream: the record says why
        raise HboneError(f"HBONE connection to {format_address(hop)} failed: {stats.error}")


async def _passthrough(pod: PodProxy, client: socket.socket, address: Address) -> None:
    upstream = await connect_tcp(address, socket_factory=pod.upstream_socket)
    await relay_tcp(client, upstream)
