"""The sidecar's L7 half: HTTP through the waypoint's pipeline, as Istio's Envoy sidecars do.

Outbound (15001): a connection to a mesh destination on a port whose service declares an
`appProtocol` (testbed.mesh.appprotocol) is HTTP or TCP as declared; an undeclared one is
sniffed (its bytes left in the socket; 100 ms of silence means a server-first protocol,
plain TCP). HTTP/1.1 or HTTP/2 is served by an L7Proxy with the destination service's
routes, Envoy's defaults (retries, LEAST_REQUEST, x-request-id and x-forwarded-*) and
metrics reported as "source"; each request goes over HBONE, in the client's HTTP version,
to the endpoint the pipeline picked (the sidecar's own certificate, no client address
forwarded). Anything else (plain TCP, a passthrough, a waypoint, a refusal) takes the L4
path unchanged.

Inbound (15008): the L4 checks and the app connection are HboneInbound's; the stream is then
HTTP or TCP as the port's service declares, or sniffed (an app that speaks first makes it
plain TCP); HTTP goes through an L7Proxy with the L7 policies of the destination (403 "RBAC:
access denied"), no routes and no retries, metrics reported as "destination", to that one
app connection (opened again if the app closed it). Plain TCP is relayed as before.

The L7 file (`--l7-config`, the waypoint's format) holds every route, L7 policy and declared
port protocol of the mesh; the sidecar applies those of the destination: routes whose
parents name the service called, policies that target a service of this workload or, with
no targets, its namespace; the declaration of the port called (a workload port: that of the
service port targeting it; Istio asks services sharing a pod port to agree on its protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from testbed.mesh.appprotocol import Handling, handling
from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.hbone import ConnectDecision, ConnectRequest, relay_tcp
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.http1 import Http1Client, open_streams
from testbed.mesh.waypoint.http2 import Http2Client
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.proxy import (
    Downstream,
    Endpoint,
    L7Proxy,
    Target,
    UpstreamConnectError,
    declared_protocol,
    resolve_target,
)
from testbed.mesh.waypoint.routing import RetryPolicy, RouteRule
from testbed.mesh.waypoint.serve import peek_protocol, serve_http
from testbed.mesh.waypoint.sniff import Protocol
from testbed.mesh.waypoint.telemetry import RequestMetrics
from testbed.mesh.waypoint.upstream import HboneUpstreams, pod_tunnel_address
from testbed.mesh.ztunnel import OUTBOUND_PORT
from testbed.mesh.ztunnel.inbound import HboneInbound, connect_app
from testbed.mesh.ztunnel.netio import Address, ByteMeter, destination_of
from testbed.mesh.ztunnel.outbound import serve_outbound
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.route import Hbone, decide_outbound

log = logging.getLogger(__name__)
HTTP: tuple[Protocol, ...] = ("http/1.1", "h2")
# How long outbound sniffing waits for the app's first bytes before taking the connection as
# plain TCP (server-first protocols): Istio's former protocolDetectionTimeout default.
OUTBOUND_SNIFF_TIMEOUT = 0.1
# Istio's inbound clusters do not retry: the client's sidecar already did.
INBOUND_RULE = RouteRule(retry=RetryPolicy(attempts=0))


def services_of(config: LocalConfig, workload: Workload, port: int | None = None) -> list[Service]:
    """The services `workload` is an endpoint of (for target port `port`, if given), by key."""
    found = []
    for service in config.services:
        for service_port in service.ports:
            endpoints = config.endpoints(service, service_port)
            if any(w.key == workload.key and port in (None, t) for w, t in endpoints):
                found.append(service)
                break
    return sorted(found, key=lambda s: s.key)


def inbound_policies(l7: WaypointConfig, config: LocalConfig, workload: Workload) -> WaypointConfig:
    """The L7 policies of `workload`'s inbound requests: those targeting one of its services
    or, with no targets, its namespace; all then apply to whatever service was called."""
    mine = {service.key for service in services_of(config, workload)}
    policies = [
        p.model_copy(update={"targets": []})
        for p in l7.policies
        if mine.intersection(p.targets) or (not p.targets and p.namespace == workload.namespace)
    ]
    return WaypointConfig(policies=policies, app_protocols=l7.app_protocols)


class AppConnection:
    """Upstreams for one inbound stream: requests on the app connection HboneInbound opened,
    in the protocol they came in (HTTP/1.1 one at a time, HTTP/2 concurrently); `reconnect`
    opens another connection when the app closed it."""

    def __init__(self, sock: socket.socket, reconnect: Callable[[], Awaitable[socket.socket]]):
        self.sock: socket.socket | None = sock
        self.reconnect = reconnect
        self.client: Http1Client | Http2Client | None = None
        self.lock = asyncio.Lock()

    async def exchange(self, endpoint: Endpoint, request: HttpRequest) -> HttpResponse:
        if request.protocol == "HTTP/2":
            async with self.lock:
                client = await self._client(Http2Client)
            return await client.exchange(request)
        async with self.lock:
            client = await self._client(Http1Client)
            return await client.exchange(request)

    async def _client(
        self, kind: type[Http1Client] | type[Http2Client]
    ) -> Http1Client | Http2Client:
        if self.client is not None and (not self.client.reusable or type(self.client) is not kind):
            self.client.close()
            self.client = None
        if self.client is None:
            sock, self.sock = self.sock, None
            try:
                sock = sock or await self.reconnect()
            except OSError as exc:
                raise UpstreamConnectError(str(exc)) from exc
            self.client = kind(*await open_streams(sock))
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        elif self.sock is not None:
            self.sock.close()


class SidecarL7:
    def __init__(self, pod: PodProxy, l7: WaypointConfig, metrics: RequestMetrics) -> None:
        self.pod = pod
        self.metrics = metrics
        identity = pod.workload.identity
        upstreams = HboneUpstreams(
            pod.hbone_client,
            pod.mesh.certs.client_context(identity),
            identity.uri,
            pod_tunnel_address,
        )
        self.outbound = L7Proxy(pod.mesh.config, WaypointConfig(), upstreams, metrics,
                                reporter="source")  # fmt: skip
        self.l7 = l7
        self.inbound_l7 = WaypointConfig()
        self._tasks: set[asyncio.Task[None]] = set()
        self.update()

    def update(self, l7: WaypointConfig | None = None) -> None:
        """After a mesh config or L7 file reload."""
        self.l7 = l7 or self.l7
        outbound = WaypointConfig(routes=self.l7.routes, app_protocols=self.l7.app_protocols)
        self.outbound.update(self.pod.mesh.config, outbound)
        self.inbound_l7 = inbound_policies(self.l7, self.pod.mesh.config, self.pod.workload)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- outbound -------------------------------------------------------------------------
    async def serve_outbound(self, pod: PodProxy, client: socket.socket, peer: Address) -> None:
        """The 15001 handler: HTTP to a mesh destination through L7, the rest through L4."""
        destination = destination_of(client, OUTBOUND_PORT)
        decision = decide_outbound(pod.mesh.config, destination, pod.mesh.pick)
        target = resolve_target(pod.mesh.config, destination)
        if isinstance(decision, Hbone) and target is not None:
            declared = self.outbound.protocol_handling(target)  # the port's appProtocol
            if declared != "tcp":  # declared HTTP: no sniffing, however late it speaks
                http = declared == "http"
                protocol = await peek_protocol(client, OUTBOUND_SNIFF_TIMEOUT, http=http)
                if protocol in HTTP:
                    assert protocol is not None
                    await self._serve_outbound_http(client, peer, destination, target, protocol)
                    return
        await serve_outbound(pod, client, peer)

    async def _serve_outbound_http(
        self,
        client: socket.socket,
        peer: Address,
        destination: Address,
        target: Target,
        protocol: Protocol,
    ) -> None:
        pod = self.pod
        identity = pod.workload.identity.uri
        record = pod.mesh.connections.open(
            listener=OUTBOUND_PORT,
            direction="outbound",
            peer=peer,
            original_dst=destination,
            path="l7",
            src_identity=identity,
        )

        def note(endpoint: Endpoint) -> None:
            workload, port = endpoint
            record.dst_identity = workload.identity.uri
            record.connect_target = format_address((str(workload.workload_ips[0]), port))
            record.upstream = format_address(pod_tunnel_address(endpoint))

        handler = functools.partial(
            self.outbound.handle, Downstream(identity, peer, target), on_endpoint=note
        )
        with ByteMeter(client) as meter:
            await serve_http(client, protocol, handler)
            sent, received = meter.counts()
        pod.mesh.connections.close(record, sent=sent, received=received)

    # -- inbound --------------------------------------------------------------------------
    def inbound(self, l4: HboneInbound) -> Callable[[ConnectRequest], Awaitable[ConnectDecision]]:
        """The HBONE server's `on_connect`: `l4`'s checks, then L7 on the accepted stream."""

        async def on_connect(request: ConnectRequest) -> ConnectDecision:
            decision = await l4(request)
            if decision.upstream is None:
                return decision
            workload = self.pod.workload
            port = request.authority[1]
            services = services_of(self.pod.mesh.config, workload, port)
            service = services[0] if services else None  # for the metrics' labels
            client = request.forwarded_for or request.peer_address
            target = Target(request.authority, service, workload)
            downstream = Downstream(request.peer_identity, client, target)
            ours, theirs = socket.socketpair()
            self._spawn(self._serve_inbound(ours, decision.upstream, downstream))
            return ConnectDecision.accept(theirs, on_closed=decision.on_closed)

        return on_connect

    async def _serve_inbound(
        self, sock: socket.socket, app: socket.socket, downstream: Downstream
    ) -> None:
        sock.setblocking(False)
        declared = self._inbound_handling(downstream.target)
        if declared == "tcp":
            protocol: Protocol | None = "tcp"
        else:
            protocol = await peek_protocol(sock, server=app, http=declared == "http")
        if protocol is None:
            sock.close()
            app.close()
            return
        if protocol not in HTTP:
            await relay_tcp(sock, app)
            return
        pod, dest, client_ip = self.pod, downstream.target.address, downstream.client[0]

        async def reconnect() -> socket.socket:
            return await connect_app(pod, dest, client_ip)

        upstream = AppConnection(app, reconnect)
        proxy = L7Proxy(pod.mesh.config, self.inbound_l7, upstream, self.metrics,
                        reporter="destination", default_rule=INBOUND_RULE,
                        forwarding_headers=False)  # fmt: skip
        try:
            await serve_http(sock, protocol, functools.partial(proxy.handle, downstream))
        finally:
            upstream.close()

    def _inbound_handling(self, target: Target) -> Handling:
        """The declared protocol of the workload's port (through the service it serves)."""
        return handling(declared_protocol(self.inbound_l7, self.pod.mesh.config, target))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
