"""Shared helpers for the HBONE tests: certificates, a loopback tunnel, upstream servers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import uvloop

from testbed.mesh.hbone import (
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneServer,
    StreamStats,
    client_context,
    connect_tcp,
    server_context,
)
from testbed.mesh.hbone.testcerts import Identity, TestPki

T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(asyncio.wait_for(coro, 60))


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (unlike a socketpair, they can be reset)."""
    with listening_socket() as listener:
        listener.setblocking(False)
        ours = socket.socket()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        connecting = loop.create_task(loop.sock_connect(ours, listener.getsockname()))
        theirs, _ = await loop.sock_accept(listener)
        await connecting
    return ours, theirs


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Identities:
    pki: TestPki
    server: Identity
    client: Identity

    def server_ctx(self) -> ssl.SSLContext:
        return server_context(self.server.cert, self.server.key, self.server.roots)

    def client_ctx(self, identity: Identity | None = None) -> ssl.SSLContext:
        chosen = identity or self.client
        return client_context(chosen.cert, chosen.key, chosen.roots)


@dataclass
class Tunnel:
    """A running HboneServer (policy via `deny`) and an HboneClient pointed at it."""

    ids: Identities
    server: HboneServer
    client: HboneClient
    requests: list[ConnectRequest] = field(default_factory=list)
    deny: set[tuple[str, int]] = field(default_factory=set)
    closed: asyncio.Queue[StreamStats] = field(default_factory=asyncio.Queue)  # server side

    async def on_connect(self, request: ConnectRequest) -> ConnectDecision:
        self.requests.append(request)
        if request.authority in self.deny:
            return ConnectDecision.reject(401)
        upstream = await connect_tcp(request.authority)
        return ConnectDecision.accept(upstream, on_closed=self.closed.put_nowait)

    async def open(
        self, authority: str, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[StreamStats]]:
        """Open a stream and relay it to a socketpair; returns the test's end as streams."""
        kwargs.setdefault("expected_identities", {self.ids.server.uri})
        kwargs.setdefault("ssl_context", self.ids.client_ctx())
        stream = await self.client.open(self.server.address, authority, **kwargs)
        ours, theirs = await tcp_pair()
        relay = asyncio.create_task(stream.relay(theirs))
        reader, writer = await asyncio.open_connection(sock=ours)
        return reader, writer, relay


@asynccontextmanager
async def tunnel(
    ids: Identities, server_options: dict[str, Any] | None = None, **client_options: Any
) -> AsyncIterator[Tunnel]:
    server = HboneServer(
        ids.server_ctx(), lambda request: state.on_connect(request), **(server_options or {})
    )
    await server.start(listening_socket())
    state = Tunnel(ids, server, HboneClient(**client_options))
    try:
        yield state
    finally:
        await state.client.close()
        await server.close()


@asynccontextmanager
async def upstream(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A plain TCP server on loopback; yields its `ip:port`."""
    server = await asyncio.start_server(handler, sock=listening_socket())
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"{host}:{port}"
    finally:
        server.close()


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(1 << 20):
        writer.write(chunk)
        await writer.drain()
    writer.close()


def h2_connect(
    address: tuple[str, int], context: ssl.SSLContext, headers: list[tuple[str, str]]
) -> int:
    """An independent HBONE client (the `h2` library over a blocking SSLSocket): the status."""
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        # h2 demands :scheme and :path on every request; a plain CONNECT has neither
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers)
        tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            if not data:
                raise ConnectionError("closed before a response")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers or [])[b":status"])
            tls.sendall(conn.data_to_send())
