"""Inbound: HBONE on 15008 (mTLS, the client's identity known) and captured plaintext on
15006 (no identity). Both apply the destination pod's L4 policies (source address: the TCP
peer; a pod bound to a waypoint takes HBONE only from that waypoint), then connect to the app
from inside the pod's namespace with the client's own source address (IP_TRANSPARENT), so
the app sees the real peer. The reply finds its way back to that socket through the pod's
connmark 0x111 -> table 100 (local) routing. Open connections are registered with the mesh
state, which closes those a later policy denies.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable

from testbed.mesh.authz import ConnectionFacts
from testbed.mesh.ca import Identity
from testbed.mesh.hbone import (
    STATUS_BAD_REQUEST,
    STATUS_UNAUTHORIZED,
    STATUS_UNAVAILABLE,
    ConnectDecision,
    ConnectRequest,
    StreamStats,
    connect_tcp,
    relay_tcp,
    reset_socket,
)
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.metrics import TrafficLabels
from testbed.mesh.proxy.connections import ConnectionRecord
from testbed.mesh.waypoint.via import from_waypoint
from testbed.mesh.ztunnel import HBONE_PORT, INBOUND_PLAINTEXT_PORT, ZTUNNEL_PORTS
from testbed.mesh.ztunnel.enforce import OpenConnection
from testbed.mesh.ztunnel.netio import Address, ByteMeter, destination_of
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.telemetry import count_denied, record_close, traffic_labels

log = logging.getLogger(__name__)


def peer_identity(uri: str | None, trust_domain: str) -> Identity | None:
    """The client's SPIFFE identity if it is one of this trust domain."""
    if uri is None:
        return None
    try:
        identity = Identity.parse(uri)
    except ValueError:
        return None
    return identity if identity.trust_domain == trust_domain else None


def _labels(pod: PodProxy, source_ip: str, principal: str | None, mtls: bool) -> TrafficLabels:
    return traffic_labels(
        "destination",
        source=pod.mesh.config.workload_by_ip(source_ip),
        source_principal=principal,
        destination=pod.workload,
        mutual_tls=mtls,
    )


def _denied(
    pod: PodProxy, facts: ConnectionFacts, labels: TrafficLabels, record: ConnectionRecord
) -> bool:
    """The pod's authorization policies refuse the connection: logged, counted, recorded."""
    decision = pod.mesh.policies.evaluate(pod.workload, facts)
    if decision.allowed:
        return False
    log.info(
        "pod %s: %s -> %s:%d denied: %s (%s)",
        pod.uid,
        facts.source_ip,
        facts.destination_ip,
        facts.destination_port,
        decision.reason,
        decision.policy,
    )
    count_denied(pod.mesh.metrics, labels)
    pod.mesh.connections.refuse(record, decision.reason)
    return True


def _closer(*socks: socket.socket) -> Callable[[], None]:
    """Ends a relayed connection from outside the relay: a reset on close (linger 0) and
    a shutdown that wakes the relay's blocked reads and writes."""

    def close() -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.shutdown(socket.SHUT_RDWR)

    return close


_LINGER_RESET = struct.pack("ii", 1, 0)


async def connect_app(pod: PodProxy, dest: Address, source_ip: str) -> socket.socket:
    return await connect_tcp(
        dest, source=(source_ip, 0), transparent=True, socket_factory=pod.transparent_socket
    )


def _inbound_record(
    pod: PodProxy, peer: Address, dest: Address, request: ConnectRequest | None
) -> ConnectionRecord:
    """The connection record of traffic to this pod's app, over HBONE (the CONNECT `request`)
    or in plaintext (none): the pod is the destination."""
    return pod.mesh.connections.open(
        listener=HBONE_PORT if request is not None else INBOUND_PLAINTEXT_PORT,
        direction="inbound",
        peer=peer,
        original_dst=dest,
        path="hbone" if request is not None else "plaintext",
        src_identity=request.peer_identity if request is not None else None,
        dst_identity=pod.workload.identity.uri,
        connect_target=format_address(dest) if request is not None else None,
    )


class HboneInbound:
    """The `on_connect` of the pod's HBONE server."""

    def __init__(self, pod: PodProxy) -> None:
        self.pod = pod

    async def __call__(self, request: ConnectRequest) -> ConnectDecision:
        pod = self.pod
        dest = request.authority
        peer = request.peer_address
        record = _inbound_record(pod, peer, dest, request)
        # Policy sees the TCP peer; the app sees the original client (`forwarded`).
        client_ip = (request.forwarded_for or peer)[0]
        labels = _labels(pod, client_ip, request.peer_identity, mtls=True)
        refusal = self._refusal(request)
        if refusal is not None:
            status, reason = refusal
            log.info(
                "pod %s: CONNECT %s from %s refused: %s",
                pod.uid,
                format_address(dest),
                format_address(peer),
                reason,
            )
            if status == STATUS_UNAUTHORIZED:
                count_denied(pod.mesh.metrics, labels)
            pod.mesh.connections.refuse(record, reason)
            return ConnectDecision.reject(status)
        workload = pod.workload
        identity = peer_identity(request.peer_identity, workload.identity.trust_domain)
        facts = ConnectionFacts(identity, peer[0], dest[0], dest[1])
        if _denied(pod, facts, labels, record):
            return ConnectDecision.reject(STATUS_UNAUTHORIZED)
        try:
            upstream = await connect_app(pod, dest, client_ip)
        except OSError as exc:
            pod.mesh.connections.refuse(record, f"app unreachable: {exc}", "error")
            raise  # the server answers 503
        record.upstream = format_address(dest)
        connection = pod.mesh.metrics.connection(labels)
        token = pod.mesh.open_inbound.add(
            OpenConnection(workload.key, facts, _closer(upstream), record)
        )

        def closed(stats: StreamStats) -> None:
            pod.mesh.open_inbound.discard(token)
            connection.received(stats.to_socket)  # what the client sent on to the app
            connection.sent(stats.from_socket)
            connection.close()
            pod.mesh.connections.close(record, sent=stats.from_socket, received=stats.to_socket)

        return ConnectDecision.accept(upstream, on_closed=closed)

    def _refusal(self, request: ConnectRequest) -> tuple[int, str] | None:
        """Why a CONNECT is refused before policy, with the status Istio's ztunnel gives."""
        pod, dest = self.pod, request.authority
        if dest[0] != pod.ip:
            return STATUS_BAD_REQUEST, f"{dest[0]} is not this pod"
        if dest[1] in ZTUNNEL_PORTS:
            return STATUS_UNAVAILABLE, f"port {dest[1]} is ztunnel's own"
        workload = pod.workload
        if peer_identity(request.peer_identity, workload.identity.trust_domain) is None:
            return STATUS_UNAUTHORIZED, "no client identity of this trust domain"
        if workload.waypoint is not None and not from_waypoint(
            pod.mesh.config, workload, request.peer_identity, request.peer_address[0]
        ):
            return STATUS_UNAUTHORIZED, "bypassed the destination's waypoint"
        return None


async def serve_inbound_plaintext(pod: PodProxy, client: socket.socket, peer: Address) -> None:
    dest = destination_of(client, INBOUND_PLAINTEXT_PORT)
    record = _inbound_record(pod, peer, dest, None)
    if dest[0] != pod.ip or dest[1] in ZTUNNEL_PORTS:
        pod.mesh.connections.refuse(record, "not for this pod's app")
        reset_socket(client)
        return
    labels = _labels(pod, peer[0], None, mtls=False)
    facts = ConnectionFacts(None, peer[0], dest[0], dest[1])
    if _denied(pod, facts, labels, record):
        reset_socket(client)
        return
    connection = pod.mesh.metrics.connection(labels)
    with ByteMeter(client) as meter:
        try:
            upstream = await connect_app(pod, dest, peer[0])
        except OSError as exc:
            log.info("pod %s: app %s unreachable: %s", pod.uid, format_address(dest), exc)
            reset_socket(client)
            record_close(connection, meter, "CONNECT")
            pod.mesh.connections.refuse(record, f"app unreachable: {exc}", "error")
            return
        record.upstream = format_address(dest)
        token = pod.mesh.open_inbound.add(
            OpenConnection(pod.workload.key, facts, _closer(client, upstream), record)
        )
        try:
            await relay_tcp(client, upstream)
        finally:
            pod.mesh.open_inbound.discard(token)
        record_close(connection, meter, "-")
        sent, received = meter.counts()
    pod.mesh.connections.close(record, sent=sent, received=received)
