"""Fuzz the waypoint's HTTP/2 path (waypoint/http2.Http2Server) over loopback TCP.

Input: the bytes a client sends after connecting (the connection preface, then frames of
any type with wrong lengths, flags and stream ids, window overflows, HPACK garbage,
CONTINUATION floods, resets mid-stream), followed by a PING probe and a half-close.
Properties: what the server sends back is HTTP/2; a connection it ends on its own ends with
a GOAWAY carrying an error code; a long-lived connection on the same server keeps getting
answers; memory stays bounded.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from fuzz_support import (
    BATCH,
    ServerProcess,
    exchange,
    h2_probe,
    h2_verdict,
    in_parallel,
    note_outcome,
    replay,
    tried,
)
from h2_inputs import h2_inputs
from hypothesis import given
from hypothesis import strategies as st

TARGET = "waypoint-h2"
RSS_LIMIT = 128 << 20  # the server process's whole RSS (~30 MiB idle)


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
    """waypoint_server.py h2, and an h2-library connection to it opened at the start."""

    def __init__(self) -> None:
        self.server = ServerProcess(Path(__file__).with_name("waypoint_server.py"), "h2")
        self.address = self.server.address
        self.canary = Canary(self.address)

    def attack(self, data: bytes) -> None:
        if not tried(TARGET):
            return
        verdict = h2_verdict(exchange(self.address, data + h2_probe()))
        note_outcome(TARGET, f"{verdict.goaway_codes[-1:]},{verdict.ping_acked}", data)
        verdict.check(data)

    def batch(self, inputs: list[bytes]) -> None:
        """Inputs on concurrent connections, then the properties of the whole server."""
        try:
            in_parallel(self.attack, inputs)
        finally:
            assert self.server.alive(), "the waypoint's HTTP/2 server process died"
        assert self.canary.served(), "another connection on the same server stopped flowing"
        assert self.server.rss() < RSS_LIMIT, "the server's memory grows without bound"

    def one_input(self, data: bytes) -> None:
        self.batch([data])

    def close(self) -> None:
        self.canary.sock.close()
        self.server.close()


def make_target() -> Callable[[bytes], None]:
    return WaypointH2().one_input


@pytest.fixture(scope="module")
def waypoint() -> Iterator[WaypointH2]:
    running = WaypointH2()
    yield running
    running.close()


@given(st.lists(h2_inputs(), min_size=BATCH, max_size=BATCH))
def test_hostile_http2_is_refused_with_goaway_and_others_flow(
    waypoint: WaypointH2, inputs: list[bytes]
) -> None:
    waypoint.batch(inputs)


def test_saved_seeds_still_get_goaway_or_answers(waypoint: WaypointH2) -> None:
    replay(TARGET, waypoint.one_input)
