"""Fuzz the waypoint's HTTP/2 path (waypoint/http2.Http2Server) over loopback TCP.

Input: the bytes a client sends after connecting (the connection preface, then frames of
any type with wrong lengths, flags and stream ids, window overflows, HPACK garbage,
CONTINUATION floods, resets mid-stream), followed by a PING probe and a half-close.
Properties: what the server sends back is HTTP/2; a connection it ends on its own ends with
a GOAWAY carrying an error code; a long-lived connection on the same server keeps getting
answers; memory stays bounded.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from fuzz_support import (
    LoopThread,
    exchange,
    h2_probe,
    h2_verdict,
    note_outcome,
    replay,
    rss_bytes,
    tried,
)
from h2_inputs import h2_inputs
from hypothesis import given

from testbed.mesh.waypoint.http2 import Http2Server
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse

TARGET = "waypoint-h2"
RSS_GROWTH_LIMIT = 96 << 20


async def _ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, [], b"ok")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    initial = await reader.read(65536)  # the waypoint sniffs "PRI " and hands over to h2
    await Http2Server(reader, writer, _ok).run(initial)


class Canary:
    """A long-lived HTTP/2 connection (the h2 library as an independent client)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def served(self) -> bool:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":path", "/c"), (":authority", "c")]
        self.conn.send_headers(stream_id, headers, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        while True:
            data = self.sock.recv(65536)
            if not data:
                return False
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    self.sock.sendall(self.conn.data_to_send())
                    return True
            self.sock.sendall(self.conn.data_to_send())


class WaypointH2:
    def __init__(self) -> None:
        self.loops = LoopThread()
        self.server = self.loops.call(asyncio.start_server(_serve, "127.0.0.1", 0))
        self.address: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        self.canary = Canary(self.address)
        self.rss_at_start = rss_bytes()

    def one_input(self, data: bytes) -> None:
        if not tried(TARGET):
            return
        verdict = h2_verdict(exchange(self.address, data + h2_probe()))
        note_outcome(TARGET, f"{verdict.goaway_codes[-1:]},{verdict.ping_acked}", data)
        verdict.check(data)
        assert self.canary.served(), "another connection on the same server stopped flowing"
        assert rss_bytes() - self.rss_at_start < RSS_GROWTH_LIMIT, "memory grows without bound"

    def close(self) -> None:
        self.canary.sock.close()
        self.loops.loop.call_soon_threadsafe(self.server.close)
        self.loops.close()


def make_target() -> Callable[[bytes], None]:
    return WaypointH2().one_input


@pytest.fixture(scope="module")
def waypoint() -> Iterator[WaypointH2]:
    running = WaypointH2()
    yield running
    running.close()


@given(h2_inputs())
def test_hostile_http2_is_refused_with_goaway_and_others_flow(
    waypoint: WaypointH2, data: bytes
) -> None:
    waypoint.one_input(data)


def test_saved_seeds_still_get_goaway_or_answers(waypoint: WaypointH2) -> None:
    replay(TARGET, waypoint.one_input)
