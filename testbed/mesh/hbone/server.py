"""HBONE server (the inbound side of a ztunnel, port 15008).

    server = HboneServer(ssl_context, on_connect)
    await server.start(listening_socket)      # a socket the caller created (e.g. in a pod netns)
    ...
    await server.close()

For each CONNECT stream the server awaits `on_connect(ConnectRequest) -> ConnectDecision`. The
callback rejects with a status (401 policy deny, 503 upstream failure, ...) or returns an
already connected upstream socket; only then is 200 sent and bytes relayed both ways. A
request that is not a plain CONNECT to `ip:port` gets 400 without calling the callback; an
exception from the callback gets 503.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

from .connect import (
    STATUS_BAD_REQUEST,
    STATUS_OK,
    STATUS_UNAVAILABLE,
    BadRequest,
    ConnectDecision,
    ConnectRequest,
    parse_request,
)
from .connection import TunnelConnection, log
from .events import RequestReceived
from .memory import keep_buffers_in_heap
from .protocol import SERVER_MAX_CONCURRENT_STREAMS, Settings
from .stream import TunnelStream
from .timers import HboneTimers

OnConnect = Callable[[ConnectRequest], Awaitable[ConnectDecision]]


class ServerConnection(TunnelConnection):
    server_side = True

    def __init__(self, context: ssl.SSLContext, owner: HboneServer) -> None:
        super().__init__(context, owner.settings)
        self.owner = owner
        self.peer_identity: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner.connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        super().connection_lost(exc)

    def on_established(self) -> None:
        spiffe = [uri for uri in self.peer_identities if uri.startswith("spiffe://")]
        self.peer_identity = spiffe[0] if spiffe else None

    def on_request(self, event: RequestReceived) -> None:
        stream = self.streams[event.stream_id] = TunnelStream(self, event.stream_id)
        task = self.loop.create_task(self._serve(stream, event.headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: TunnelStream, headers: list[tuple[str, str]]) -> None:
        try:
            request = parse_request(
                headers, self.peer_identity, self.peer_address, self.local_address
            )
        except BadRequest as exc:
            log.info("hbone server %s: 400: %s", self.peer_address, exc)
            self._respond(stream, STATUS_BAD_REQUEST)
            return
        decision = await self._decide(request)
        if stream.done.done():  # reset by the peer, or the connection died, meanwhile
            if decision.upstream is not None:
                decision.upstream.close()
            return
        if decision.status != STATUS_OK or decision.upstream is None:
            self._respond(stream, decision.status)
            return
        self.send_headers(stream.id, [(":status", "200")], end=False)
        stats = await stream.attach(decision.upstream)
        if decision.on_closed is not None:
            decision.on_closed(stats)

    async def _decide(self, request: ConnectRequest) -> ConnectDecision:
        try:
            return await self.owner.on_connect(request)
        except OSError as exc:
            log.info("hbone server: upstream %s failed: %s", request.authority, exc)
        except Exception as exc:
            log.warning("hbone server: on_connect failed for %s: %r", request.authority, exc)
        return ConnectDecision.reject(STATUS_UNAVAILABLE)

    def _respond(self, stream: TunnelStream, status: int) -> None:
        if stream.id in self.streams:
            self.send_headers(stream.id, [(":status", str(status))], end=True)
            stream.sent_end = True
            self.forget(stream)


class HboneServer:
    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        on_connect: OnConnect,
        *,
        max_streams: int = SERVER_MAX_CONCURRENT_STREAMS,
        timers: HboneTimers | None = None,
    ) -> None:
        """`max_streams` per connection are announced and enforced (Istio's 200); `timers`
        (the keepalive) default to Istio's, as the environment overrides them."""
        self.ssl_context = ssl_context
        self.on_connect = on_connect
        chosen = timers or HboneTimers.from_env()
        self.settings = Settings.server(
            max_concurrent_streams=max_streams,
            ping_interval=chosen.ping_interval,
            ping_timeout=chosen.ping_timeout,
        )
        keep_buffers_in_heap()
        self.connections: set[ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound (listening or not) TCP socket owned by the caller."""
        sock.setblocking(False)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ServerConnection(self.ssl_context, self), sock=sock, backlog=1024
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Stop accepting and close every connection (open streams are reset)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
