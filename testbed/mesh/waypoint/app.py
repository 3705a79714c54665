"""The waypoint process: HBONE server, per-tunnel protocol handling, admin ports, reloads.

Each accepted CONNECT is checked (client identity present, target known to the mesh) and
answered 200 with one end of a socket pair; the waypoint reads the other end, sniffs the
protocol and serves HTTP/1.1 or HTTP/2 through the L7 pipeline, or relays plain TCP to an
endpoint of the target when L4 policy allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from testbed.mesh import config as mesh_config
from testbed.mesh.ca import CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE
from testbed.mesh.config import ConfigError, LocalConfig
from testbed.mesh.hbone import (
    STATUS_BAD_REQUEST,
    STATUS_UNAUTHORIZED,
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneServer,
    client_context,
    relay_tcp,
    reset_socket,
    server_context,
    uri_sans,
)
from testbed.mesh.metrics import CONTENT_TYPE, Registry
from testbed.mesh.waypoint import HBONE_PORT, METRICS_PORT, READY_PORT
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.http1 import open_streams, serve_http1
from testbed.mesh.waypoint.http2 import Http2Server
from testbed.mesh.waypoint.proxy import Downstream, L7Proxy, resolve_target
from testbed.mesh.waypoint.routing import DEFAULT_RULE
from testbed.mesh.waypoint.sniff import Protocol, sniff
from testbed.mesh.waypoint.telemetry import RequestMetrics
from testbed.mesh.waypoint.upstream import HboneUpstreams, TunnelAddress, pod_tunnel_address
from testbed.mesh.ztunnel.admin import Response, serve_http

log = logging.getLogger(__name__)
SNIFF_TIMEOUT = 1.0  # a client that says nothing for this long is taken as plain TCP
SNIFF_READ = 4096
RELOAD_INTERVAL = 0.5


@dataclass(frozen=True)
class Settings:
    mesh_config: Path
    l7_config: Path
    certs: Path
    bind: str = "0.0.0.0"
    hbone_port: int = HBONE_PORT
    metrics_port: int = METRICS_PORT
    ready_port: int = READY_PORT


def _identity_of(cert_pem: Path) -> str:
    der = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_bytes(Encoding.DER)
    spiffe = [uri for uri in uri_sans(der) if uri.startswith("spiffe://")]
    if not spiffe:
        raise ConfigError(f"{cert_pem}: no spiffe:// URI SAN")
    return spiffe[0]


class Waypoint:
    def __init__(
        self, settings: Settings, tunnel_address: TunnelAddress = pod_tunnel_address
    ) -> None:
        self.settings = settings
        files = (
            settings.certs / CERT_CHAIN_FILE,
            settings.certs / KEY_FILE,
            settings.certs / ROOT_CERT_FILE,
        )
        self.identity = _identity_of(files[0])
        self.registry = Registry()
        self.upstreams = HboneUpstreams(
            HboneClient(), client_context(*files), self.identity, tunnel_address
        )
        self.proxy = L7Proxy(
            LocalConfig.load(settings.mesh_config),
            WaypointConfig.load(settings.l7_config),
            self.upstreams,
            RequestMetrics.register(self.registry),
        )
        self.hbone = HboneServer(server_context(*files), self.on_connect)
        self._admin: list[asyncio.Server] = []
        self._tunnels: set[asyncio.Task[None]] = set()
        self.ready = False

    # -- HBONE ----------------------------------------------------------------------------
    async def on_connect(self, request: ConnectRequest) -> ConnectDecision:
        target = resolve_target(self.proxy.mesh, request.authority)
        if target is None:
            log.info("CONNECT %s: not a service or workload of the mesh", request.authority)
            return ConnectDecision.reject(STATUS_BAD_REQUEST)
        if request.peer_identity is None:
            return ConnectDecision.reject(STATUS_UNAUTHORIZED)
        client = request.forwarded_for or request.peer_address
        downstream = Downstream(request.peer_identity, client, target)
        ours, theirs = socket.socketpair()
        task = asyncio.get_running_loop().create_task(self.serve_tunnel(ours, downstream))
        self._tunnels.add(task)
        task.add_done_callback(self._tunnels.discard)
        return ConnectDecision.accept(theirs)

    async def serve_tunnel(self, sock: socket.socket, downstream: Downstream) -> None:
        sock.setblocking(False)
        protocol, initial = await _sniff(sock)
        if protocol == "tcp":  # also a client silent past SNIFF_TIMEOUT (server speaks first)
            await self._pass_tcp(sock, downstream, initial)
            return
        if protocol not in ("h2", "http/1.1"):
            sock.close()  # closed before saying anything (or said nothing we could pass on)
            return
        handler = functools.partial(self.proxy.handle, downstream)
        if protocol == "h2":
            reader, writer = await asyncio.open_connection(sock=sock)
            await Http2Server(reader, writer, handler).run(initial)
        else:
            await serve_http1(*await open_streams(sock, initial), handler)

    async def _pass_tcp(self, sock: socket.socket, downstream: Downstream, initial: bytes) -> None:
        endpoints = self.proxy.endpoints(downstream.target, DEFAULT_RULE)
        if not self.proxy.allows_tcp(downstream) or not endpoints:
            log.info("tcp %s -> %s refused", downstream.client, downstream.target.address)
            reset_socket(sock)
            return
        try:
            endpoint = endpoints[int(self.proxy.rand() * len(endpoints)) % len(endpoints)]
            upstream = await self.upstreams.open_socket(endpoint, downstream.client)
        except ConnectionError as exc:
            log.info("tcp %s -> %s: %s", downstream.client, downstream.target.address, exc)
            reset_socket(sock)
            return
        upstream.sendall(initial)
        await relay_tcp(sock, upstream)

    # -- admin ----------------------------------------------------------------------------
    def metrics(self) -> Response:
        return Response(200, self.registry.render().encode(), CONTENT_TYPE)

    def readiness(self) -> Response:
        return Response(200, b"ready\n") if self.ready else Response(503, b"not ready\n")

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        settings = self.settings
        listener = socket.create_server((settings.bind, settings.hbone_port), backlog=1024)
        await self.hbone.start(listener)
        self._admin = [
            await serve_http(settings.bind, settings.metrics_port, {"/metrics": self.metrics}),
            await serve_http(
                settings.bind, settings.ready_port, {"/healthz/ready": self.readiness}
            ),
        ]
        self.ready = True
        log.info("waypoint %s serving HBONE on %s", self.identity, self.hbone.address)

    def reload(self, mesh: LocalConfig | None = None, l7: WaypointConfig | None = None) -> None:
        self.proxy.update(mesh or self.proxy.mesh, l7 or self.proxy.l7)
        log.info("configuration reloaded")

    async def close(self) -> None:
        self.ready = False
        for server in self._admin:
            server.close()
        await self.hbone.close()
        for task in list(self._tunnels):
            task.cancel()
        await self.upstreams.close()

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.gather(
                mesh_config.watch(self.settings.mesh_config, lambda m: self.reload(mesh=m)),
                watch_l7(self.settings.l7_config, lambda c: self.reload(l7=c)),
            )
        finally:
            await self.close()


async def _sniff(sock: socket.socket) -> tuple[Protocol | None, bytes]:
    """The protocol from the first bytes (None: closed before any byte came)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SNIFF_TIMEOUT
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, SNIFF_READ), deadline - loop.time())
        except (TimeoutError, ConnectionError):
            return "tcp", data
        if not chunk:
            return ("tcp" if data else None), data
        data += chunk
        protocol = sniff(data)
        if protocol != "more":
            return protocol, data


async def watch_l7(path: Path, on_change: Callable[[WaypointConfig], None]) -> None:
    """Poll `path` until cancelled; `on_change(config)` after each valid change."""
    signature = _signature(path)
    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        current = _signature(path)
        if current == signature or current is None:
            continue
        signature = current
        try:
            on_change(WaypointConfig.load(path))
        except ConfigError as exc:
            log.error("keeping the previous L7 config: %s", exc)


def _signature(path: Path) -> tuple[int, int, int] | None:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size, st.st_ino
    return None
