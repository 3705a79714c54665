"""The waypoint process: HBONE server and per-tunnel protocol handling, in the proxy shell
(testbed.mesh.proxy: admin on localhost, metrics, readiness, connection records, reloads).

Each accepted CONNECT is checked (client identity present, target known to the mesh) and
answered 200 with one end of a socket pair; the waypoint reads the other end, sniffs the
protocol and serves HTTP/1.1 or HTTP/2 through the L7 pipeline, or relays plain TCP to an
endpoint of the target when L4 policy allows it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from testbed.mesh.ca import CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE
from testbed.mesh.config import ConfigError, LocalConfig
from testbed.mesh.hbone import (
    STATUS_BAD_REQUEST,
    STATUS_UNAUTHORIZED,
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneServer,
    StreamStats,
    client_context,
    relay_tcp,
    reset_socket,
    server_context,
    uri_sans,
)
from testbed.mesh.hbone.connect import format_address
from testbed.mesh.metrics import Registry
from testbed.mesh.proxy import ADMIN_HOST
from testbed.mesh.proxy.connections import ConnectionLog, ConnectionRecord
from testbed.mesh.proxy.shell import AdminPorts, ProxyProcess
from testbed.mesh.proxy.watch import Watched
from testbed.mesh.waypoint import ADMIN_PORT, HBONE_PORT, METRICS_PORT, READY_PORT
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.proxy import Downstream, Endpoint, L7Proxy, resolve_target
from testbed.mesh.waypoint.routing import DEFAULT_RULE
from testbed.mesh.waypoint.serve import SNIFF_READ, SNIFF_TIMEOUT, serve_http
from testbed.mesh.waypoint.sniff import Protocol, sniff
from testbed.mesh.waypoint.telemetry import RequestMetrics
from testbed.mesh.waypoint.upstream import HboneUpstreams, TunnelAddress, pod_tunnel_address

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    mesh_config: Path
    l7_config: Path
    certs: Path
    bind: str = "0.0.0.0"
    hbone_port: int = HBONE_PORT
    metrics_port: int = METRICS_PORT
    ready_port: int = READY_PORT
    admin_port: int = ADMIN_PORT  # always on localhost


def _identity_of(cert_pem: Path) -> str:
    try:
        der = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_bytes(Encoding.DER)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_pem}: not a readable PEM certificate: {exc}") from exc
    spiffe = [uri for uri in uri_sans(der) if uri.startswith("spiffe://")]
    if not spiffe:
        raise ConfigError(f"{cert_pem}: no spiffe:// URI SAN")
    return spiffe[0]


class Waypoint(ProxyProcess):
    def __init__(
        self, settings: Settings, tunnel_address: TunnelAddress = pod_tunnel_address
    ) -> None:
        ports = AdminPorts(
            settings.admin_port,
            settings.metrics_port,
            settings.ready_port,
            ADMIN_HOST,
            settings.bind,
        )
        super().__init__(Registry(), ConnectionLog("waypoint"), ports)
        self.settings = settings
        files = (
            settings.certs / CERT_CHAIN_FILE,
            settings.certs / KEY_FILE,
            settings.certs / ROOT_CERT_FILE,
        )
        self.identity = _identity_of(files[0])
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
        self._tunnels: set[asyncio.Task[None]] = set()

    # -- HBONE ----------------------------------------------------------------------------
    async def on_connect(self, request: ConnectRequest) -> ConnectDecision:
        record = self.connections.open(
            listener=request.local_address[1] or self.settings.hbone_port,
            direction="inbound",
            peer=request.peer_address,
            original_dst=request.authority,
            path="l7",
            src_identity=request.peer_identity,
            dst_identity=self.identity,
            connect_target=format_address(request.authority),
        )
        target = resolve_target(self.proxy.mesh, request.authority)
        if target is None:
            log.info("CONNECT %s: not a service or workload of the mesh", request.authority)
            self.connections.refuse(record, "not a service or workload of the mesh")
            return ConnectDecision.reject(STATUS_BAD_REQUEST)
        if request.peer_identity is None:
            self.connections.refuse(record, "no client identity")
            return ConnectDecision.reject(STATUS_UNAUTHORIZED)
        client = request.forwarded_for or request.peer_address
        downstream = Downstream(request.peer_identity, client, target)
        ours, theirs = socket.socketpair()
        task = asyncio.get_running_loop().create_task(self.serve_tunnel(ours, downstream, record))
        self._tunnels.add(task)
        task.add_done_callback(self._tunnels.discard)

        def closed(stats: StreamStats) -> None:
            self.connections.close(record, sent=stats.from_socket, received=stats.to_socket)

        return ConnectDecision.accept(theirs, on_closed=closed)

    async def serve_tunnel(
        self, sock: socket.socket, downstream: Downstream, record: ConnectionRecord | None = None
    ) -> None:
        sock.setblocking(False)
        declared = self.proxy.protocol_handling(downstream.target)  # the port's appProtocol
        protocol: Protocol | None = "tcp"
        initial = b""
        if declared != "tcp":
            protocol, initial = await _sniff(sock, http=declared == "http")
        if protocol == "tcp":  # also a client silent past SNIFF_TIMEOUT (server speaks first)
            if record is not None:
                record.path = "hbone"
            await self._pass_tcp(sock, downstream, initial, record)
            return
        if protocol not in ("h2", "http/1.1"):
            sock.close()  # closed before saying anything (or said nothing we could pass on)
            return
        handler = functools.partial(self.proxy.handle, downstream, on_endpoint=self._note(record))
        await serve_http(sock, protocol, handler, initial)

    def _note(self, record: ConnectionRecord | None) -> Callable[[Endpoint], None] | None:
        """Keeps the HBONE address of the endpoint that last answered in the record."""
        if record is None:
            return None

        def note(endpoint: Endpoint) -> None:
            record.upstream = format_address(self.upstreams.tunnel_address(endpoint))

        return note

    async def _pass_tcp(
        self,
        sock: socket.socket,
        downstream: Downstream,
        initial: bytes,
        record: ConnectionRecord | None,
    ) -> None:
        endpoints = self.proxy.endpoints(downstream.target, DEFAULT_RULE)
        if not self.proxy.allows_tcp(downstream) or not endpoints:
            log.info("tcp %s -> %s refused", downstream.client, downstream.target.address)
            if record is not None:
                record.verdict, record.reason = "deny", "L4 policy or no endpoint"
            reset_socket(sock)
            return
        endpoint = endpoints[int(self.proxy.rand() * len(endpoints)) % len(endpoints)]
        if record is not None:
            record.upstream = format_address(self.upstreams.tunnel_address(endpoint))
        try:
            upstream = await self.upstreams.open_socket(endpoint)
        except ConnectionError as exc:
            log.info("tcp %s -> %s: %s", downstream.client, downstream.target.address, exc)
            if record is not None:
                record.verdict, record.reason = "error", str(exc)
            reset_socket(sock)
            return
        upstream.sendall(initial)
        await relay_tcp(sock, upstream)

    # -- the shell's hooks -------------------------------------------------------------------
    def config_dump(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "ready": self.ready,
            "hbone": format_address(self.hbone.address) if self.ready else None,
            "l7": self.proxy.l7.model_dump(mode="json", by_alias=True, exclude_defaults=True),
        }

    def watched(self) -> Sequence[Watched[Any]]:
        return [
            Watched(self.settings.mesh_config, LocalConfig.load, lambda m: self.reload(mesh=m)),
            Watched(self.settings.l7_config, WaypointConfig.load, lambda c: self.reload(l7=c)),
        ]

    async def start(self) -> None:
        settings = self.settings
        listener = socket.create_server((settings.bind, settings.hbone_port), backlog=1024)
        await self.hbone.start(listener)
        self.ready = True
        log.info("waypoint %s serving HBONE on %s", self.identity, self.hbone.address)

    def reload(self, mesh: LocalConfig | None = None, l7: WaypointConfig | None = None) -> None:
        self.proxy.update(mesh or self.proxy.mesh, l7 or self.proxy.l7)
        log.info("configuration reloaded")

    async def stop(self) -> None:
        await self.hbone.close()
        for task in list(self._tunnels):
            task.cancel()
        await self.upstreams.close()


async def _sniff(sock: socket.socket, http: bool = False) -> tuple[Protocol | None, bytes]:
    """The protocol from the first bytes (None: closed before any byte came). A port
    declared HTTP (`http`) is HTTP whatever comes and however late: only the version is
    read from the bytes (the HTTP/2 preface, else HTTP/1.1, whose parser refuses garbage)."""
    loop = asyncio.get_running_loop()
    deadline = None if http else loop.time() + SNIFF_TIMEOUT
    data = b""
    while True:
        try:
            left = None if deadline is None else deadline - loop.time()
            chunk = await asyncio.wait_for(loop.sock_recv(sock, SNIFF_READ), left)
        except (TimeoutError, ConnectionError):
            return "tcp", data
        if not chunk:
            return ("tcp" if data else None), data
        data += chunk
        protocol = sniff(data)
        if protocol != "more":
            return ("http/1.1" if http and protocol == "tcp" else protocol), data
