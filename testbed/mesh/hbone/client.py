"""HBONE client with a connection pool (the outbound side of a ztunnel).

    client = HboneClient()
    stream = await client.open(("10.0.0.7", 15008), "10.0.0.7:8080", ssl_context=ctx,
                               expected_identities={"spiffe://cluster.local/ns/b/sa/b"},
                               source=("10.0.0.5", 40000), headers={"traceparent": ...})
    await stream.relay(accepted_client_socket)   # until both directions are closed
    await client.close()

Connections are pooled per (source identity, destination identities, destination address,
source IP) and carry at most `max_streams` concurrent streams, and never more than the server
allows (its SETTINGS_MAX_CONCURRENT_STREAMS); a full connection makes the pool open another.
As in Istio's pool, a connection nobody has asked for in `pool_idle_timeout` (5 minutes) is
released: it takes no new streams and closes with GOAWAY NO_ERROR once its streams have ended
(one timer per connection, re-armed lazily: opening a stream only notes the time). A server
whose certificate's URI SAN is not among `expected_identities` fails the connection with
HboneError; a non-200 answer raises HboneError with `.status`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable

from .connect import Address, StreamStats, format_address, request_headers, response_status
from .connection import HboneError, TunnelConnection, log
from .memory import keep_buffers_in_heap
from .protocol import Settings
from .stream import TunnelStream
from .timers import HboneTimers

MAX_STREAMS_PER_CONNECTION = 100
CONNECT_TIMEOUT = 10.0

PoolKey = tuple[str, frozenset[str], Address, str | None]
SocketFactory = Callable[[int], socket.socket]


class ClientConnection(TunnelConnection):
    server_side = False

    def __init__(
        self,
        context: ssl.SSLContext,
        expected: frozenset[str],
        max_streams: int,
        timers: HboneTimers,
    ) -> None:
        settings = Settings.client(
            ping_interval=timers.ping_interval, ping_timeout=timers.ping_timeout
        )
        super().__init__(context, settings)
        self.expected = expected
        self.max_streams = max_streams
        self.tls.expect_peer(expected)  # refused during the handshake, with a TLS alert
        self.idle_timeout = timers.pool_idle_timeout
        self.last_used = self.loop.time()  # when the pool last handed it out
        self.released = False  # idle too long: no new streams, closed once its streams end
        self._idle_timer: asyncio.TimerHandle | None = None

    def on_established(self) -> None:
        if self.expected and not self.expected.intersection(self.peer_identities):
            raise HboneError(
                f"server {self.peer_address} identity {self.peer_identities} is not one of the "
                f"expected {sorted(self.expected)}"
            )

    def has_capacity(self) -> bool:
        usable = (
            self.ready.done()
            and self.ready.exception() is None
            and not self.closed.done()
            and self.transport is not None
            and not self.transport.is_closing()
        )
        return (
            usable
            and not self.released
            and len(self.streams) < self.max_streams
            and self.proto.can_open_stream()
        )

    def open_stream(self, headers: list[tuple[str, str]]) -> TunnelStream:
        self.last_used = self.loop.time()
        stream_id = self.proto.open_stream(headers)
        stream = self.streams[stream_id] = TunnelStream(self, stream_id)
        self.flush()
        return stream

    # -- idle release -------------------------------------------------------------------
    def watch_idle(self) -> None:
        """Arm the idle timer; it re-arms itself while the connection keeps being used."""
        self._idle_timer = self.loop.call_at(self.last_used + self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() - self.last_used < self.idle_timeout:
            self.watch_idle()
            return
        log.info(
            "hbone client %s: releasing the connection, unused for %g s",
            self.peer_address,
            self.idle_timeout,
        )
        self.released = True
        if not self.streams:
            self.close()

    def forget(self, stream: TunnelStream) -> None:
        super().forget(stream)
        if self.released and not self.streams:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        super().connection_lost(exc)


class HboneStream:
    """An accepted (200) CONNECT stream; `relay()` binds it to a connected TCP socket."""

    def __init__(self, stream: TunnelStream, connection: ClientConnection) -> None:
        self._stream = stream
        self.connection = connection

    @property
    def stream_id(self) -> int:
        return self._stream.id

    async def relay(self, sock: socket.socket) -> StreamStats:
        """Relay bytes both ways between the stream and `sock` until both sides are closed."""
        return await self._stream.attach(sock)

    def reset(self) -> None:
        self._stream.reset()


class HboneClient:
    def __init__(
        self,
        *,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        connect_timeout: float = CONNECT_TIMEOUT,
        socket_factory: SocketFactory | None = None,
        timers: HboneTimers | None = None,
    ) -> None:
        """`socket_factory(family)` makes the TCP socket to connect (e.g. inside a pod netns);
        `timers` (keepalive, idle release) default to Istio's, as the environment overrides."""
        keep_buffers_in_heap()
        self.max_streams = max_streams
        self.timers = timers or HboneTimers.from_env()
        self.connect_timeout = connect_timeout
        self.socket_factory = socket_factory or (lambda family: socket.socket(family))
        self._pools: dict[PoolKey, list[ClientConnection]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}

    async def open(
        self,
        dest: Address,
        authority: str,
        *,
        ssl_context: ssl.SSLContext,
        expected_identities: Iterable[str],
        source_identity: str = "",
        source_ip: str | None = None,
        source: Address | None = None,
        headers: dict[str, str] | None = None,
    ) -> HboneStream:
        """CONNECT to `authority` through the HBONE server at `dest`; returns once 200 came.

        `source` is the original client address sent as `forwarded: for=`; `headers` adds
        e.g. `baggage` and `traceparent`. Raises HboneError (with `.status` for non-200).
        """
        key = (source_identity, frozenset(expected_identities), dest, source_ip)
        request = request_headers(authority, source, headers)
        async with self._locks.setdefault(key, asyncio.Lock()):
            conn = await self._connection_for(key, ssl_context)
            stream = conn.open_stream(request)
        try:
            response = await asyncio.wait_for(stream.response, self.connect_timeout)
        except (TimeoutError, ConnectionError) as exc:
            stream.reset()
            raise HboneError(f"CONNECT {authority} via {format_address(dest)}: {exc}") from exc
        status = response_status(response)
        if status != 200:
            stream.reset()
            raise HboneError(f"CONNECT {authority} via {format_address(dest)}: {status}", status)
        return HboneStream(stream, conn)

    async def _connection_for(self, key: PoolKey, context: ssl.SSLContext) -> ClientConnection:
        pool = self._pools.setdefault(key, [])
        pool[:] = [conn for conn in pool if not conn.closed.done()]
        for conn in pool:
            if conn.has_capacity():
                return conn
        conn = await self._connect(key, context)
        pool.append(conn)
        return conn

    async def _connect(self, key: PoolKey, context: ssl.SSLContext) -> ClientConnection:
        _, expected, dest, source_ip = key
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
        sock = self.socket_factory(family)
        try:
            sock.setblocking(False)
            if source_ip is not None:
                sock.bind((source_ip, 0))
            await asyncio.wait_for(loop.sock_connect(sock, dest), self.connect_timeout)
            _, conn = await loop.create_connection(
                lambda: ClientConnection(context, expected, self.max_streams, self.timers),
                sock=sock,
            )
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise HboneError(f"HBONE connect to {format_address(dest)} failed: {exc}") from exc
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), self.connect_timeout)
        except (TimeoutError, ConnectionError) as exc:
            conn.close()
            raise HboneError(f"HBONE handshake with {format_address(dest)}: {exc}") from exc
        conn.watch_idle()
        return conn

    def connections(self) -> list[ClientConnection]:
        return [conn for pool in self._pools.values() for conn in pool if not conn.closed.done()]

    async def close(self) -> None:
        for conn in self.connections():
            conn.close()
        self._pools.clear()
