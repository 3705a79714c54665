"""Inbound: HBONE on 15008 (mTLS, the client's identity known) and captured plaintext on
15006 (no identity). Both apply the destination pod's L4 policies, then connect to the app
from inside the pod's namespace with the client's own source address (IP_TRANSPARENT), so
the app sees the real peer. The reply finds its way back to that socket through the pod's
connmark 0x111 -> table 100 (local) routing.
"""

from __future__ import annotations

import logging
import socket

from testbed.mesh.authz import ConnectionFacts
from testbed.mesh.ca import Identity
from testbed.mesh.hbone import (
    STATUS_BAD_REQUEST,
    STATUS_UNAUTHORIZED,
    ConnectDecision,
    ConnectRequest,
    StreamStats,
    connect_tcp,
    relay_tcp,
    reset_socket,
)
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.metrics import TrafficLabels
from testbed.mesh.ztunnel import INBOUND_PLAINTEXT_PORT, ZTUNNEL_PORTS
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


def _allowed(pod: PodProxy, identity: Identity | None, source_ip: str, dest: Address) -> bool:
    facts = ConnectionFacts(identity, source_ip, dest[0], dest[1])
    decision = pod.mesh.policies.evaluate(pod.workload, facts)
    if not decision.allowed:
        log.info(
            "pod %s: %s -> %s denied: %s (%s)",
            pod.uid,
            source_ip,
            format_address(dest),
            decision.reason,
            decision.policy,
        )
    return decision.allowed


async def connect_app(pod: PodProxy, dest: Address, source_ip: str) -> socket.socket:
    return await connect_tcp(
        dest, source=(source_ip, 0), transparent=True, socket_factory=pod.transparent_socket
    )


class HboneInbound:
    """The `on_connect` of the pod's HBONE server."""

    def __init__(self, pod: PodProxy) -> None:
        self.pod = pod

    async def __call__(self, request: ConnectRequest) -> ConnectDecision:
        pod = self.pod
        dest = request.authority
        if dest[0] != pod.ip or dest[1] in ZTUNNEL_PORTS:
            log.info("pod %s: CONNECT %s is not for this pod", pod.uid, format_address(dest))
            return ConnectDecision.reject(STATUS_BAD_REQUEST)
        workload = pod.workload
        identity = peer_identity(request.peer_identity, workload.identity.trust_domain)
        forwarded = request.forwarded_for
        source_ip = forwarded[0] if forwarded else request.peer_address[0]
        labels = _labels(pod, source_ip, request.peer_identity, mtls=True)
        if identity is None or not _allowed(pod, identity, source_ip, dest):
            count_denied(pod.mesh.metrics, labels)
            return ConnectDecision.reject(STATUS_UNAUTHORIZED)
        upstream = await connect_app(pod, dest, source_ip)  # OSError: the server answers 503
        connection = pod.mesh.metrics.connection(labels)

        def closed(stats: StreamStats) -> None:
            connection.received(stats.to_socket)  # what the client sent on to the app
            connection.sent(stats.from_socket)
            connection.close()

        return ConnectDecision.accept(upstream, on_closed=closed)


async def serve_inbound_plaintext(pod: PodProxy, client: socket.socket, peer: Address) -> None:
    dest = destination_of(client, INBOUND_PLAINTEXT_PORT)
    if dest[0] != pod.ip or dest[1] in ZTUNNEL_PORTS:
        reset_socket(client)
        return
    labels = _labels(pod, peer[0], None, mtls=False)
    if not _allowed(pod, None, peer[0], dest):
        count_denied(pod.mesh.metrics, labels)
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
            return
        await relay_tcp(client, upstream)
        record_close(connection, meter, "-")
