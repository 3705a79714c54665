"""Fuzz the waypoint's HTTP/1.1 parser (h1codec) and its server loop (http1.serve_http1).

Properties: any head parses or raises ParseError with a status a server may answer (nothing
else escapes); the server answers a malformed request with exactly that status and closes
the connection; a keep-alive connection opened before keeps being served; memory stays
bounded.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_support import (
    BATCH,
    ServerProcess,
    exchange,
    in_parallel,
    note_outcome,
    replay,
    tried,
)
from hypothesis import given
from hypothesis import strategies as st

from testbed.mesh.waypoint.h1codec import (
    ParseError,
    chunk_size,
    framing,
    parse_request_head,
    parse_response_head,
)
from testbed.mesh.waypoint.messages import MAX_HEADER_BYTES

TARGET = "http1-parser"
SERVER_TARGET = "http1-server"
STATUSES = {400, 413, 431, 501}
RSS_LIMIT = 128 << 20  # the server process's whole RSS (~30 MiB idle)
HEAD_LIMIT = MAX_HEADER_BYTES
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def expected_status(data: bytes) -> int | None:
    """What the waypoint must answer the first request in `data`: None if it is valid."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:  # the connection ends inside a head: too large, cut short, or nothing sent
        if len(data) > HEAD_LIMIT:
            return 431
        return 400 if data.strip() else None
    try:
        request = parse_request_head(head + sep)
        framing(request.headers, is_request=True)
    except ParseError as exc:
        return exc.status
    return None


def one_input(data: bytes) -> None:
    if not tried(TARGET):
        return
    outcomes = []
    for parse in (parse_request_head, parse_response_head):
        try:
            head = parse(data)
            framing(head.headers, is_request=parse is parse_request_head)
            outcomes.append("ok")
        except ParseError as exc:
            assert exc.status in STATUSES | {502}, exc.status
            outcomes.append(str(exc.status))
    line = data.split(b"\r\n", 1)[0]
    try:
        chunk_size(line)
        outcomes.append("chunk")
    except ParseError:
        outcomes.append("nochunk")
    note_outcome(TARGET, ",".join(outcomes), data)


_token = st.from_regex(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,8}\Z")
_value = st.one_of(
    st.binary(max_size=20),
    st.sampled_from(
        [b"0", b"5", b"-1", b"1" * 19, b"5\xb3", b"chunked", b"gzip, chunked", b"close"]
    ),
)
_header_name = st.one_of(
    _token,
    st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect"]),
    st.binary(max_size=6),
)
_header = st.builds(
    lambda n, sep, v: n + sep + v, _header_name, st.sampled_from([b": ", b":", b" : "]), _value
)
_request_line = st.builds(
    lambda m, t, v: m + b" " + t + b" " + v,
    st.one_of(st.sampled_from([b"GET", b"POST", b"PUT"]), _token, st.binary(max_size=5)),
    st.one_of(st.just(b"/"), st.binary(min_size=1, max_size=12)),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b""]),
)
_heads = st.builds(
    lambda line, headers, eol, body: line + eol + b"".join(h + eol for h in headers) + eol + body,
    _request_line,
    st.lists(_header, max_size=5).map(lambda hs: [b"Host: x", *hs] if len(hs) % 2 else hs),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"]),
    st.one_of(
        st.just(b""),
        st.binary(max_size=30),
        st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"5\r\nhel"]),
    ),
)
_inputs = st.one_of(
    _heads, st.binary(max_size=200), st.just(b"GET / HTTP/1.1\r\nA: " + b"x" * 20000)
)


@given(_inputs)
def test_parser_raises_only_parse_errors(data: bytes) -> None:
    one_input(data)


def test_saved_seeds_still_parse_or_fail_cleanly() -> None:
    replay(TARGET, one_input)


# ---------------------------------------------------------------- the server loop


class Http1Server:
    """waypoint_server.py h1, and a keep-alive connection to it opened at the start."""

    def __init__(self) -> None:
        self.server = ServerProcess(Path(__file__).with_name("waypoint_server.py"), "h1")
        self.address = self.server.address
        self.canary = socket.create_connection(self.address, timeout=10)

    def canary_served(self) -> bool:
        """The long-lived keep-alive connection still gets answers."""
        self.canary.sendall(b"GET /canary HTTP/1.1\r\nHost: c\r\n\r\n")
        response = b""
        while not response.endswith(b"ok"):
            chunk = self.canary.recv(4096)
            if not chunk:
                return False
            response += chunk
        return response.startswith(b"HTTP/1.1 200 ")

    def attack(self, data: bytes) -> None:
        """One input on its own connection: the status the parser gives it, then the close."""
        if not tried(SERVER_TARGET):
            return
        reply = exchange(self.address, data)  # returns once the server closed the connection
        statuses = [int(s) for s in _STATUS.findall(reply)]
        expected = expected_status(data)
        note_outcome(SERVER_TARGET, f"{expected},{statuses[-1:] or None}", data)
        if expected is not None:
            assert statuses and statuses[0] == expected, (expected, reply[:200])
            assert reply.count(b"HTTP/1.1 ") == 1, "nothing may follow the error answer"
        for status in statuses:
            assert status in {100, 200} | STATUSES, status

    def batch(self, inputs: list[bytes]) -> None:
        """Inputs on concurrent connections, then the properties of the whole server."""
        try:
            in_parallel(self.attack, inputs)
        finally:
            assert self.server.alive(), "the waypoint's HTTP/1.1 server process died"
        assert self.canary_served(), "another connection on the same server stopped flowing"
        assert self.server.rss() < RSS_LIMIT, "the server's memory grows without bound"

    def close(self) -> None:
        self.canary.close()
        self.server.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Http1Server]:
    running = Http1Server()
    yield running
    running.close()


@given(st.lists(_inputs, min_size=BATCH, max_size=BATCH))
def test_server_answers_garbage_with_its_status_and_closes(
    server: Http1Server, inputs: list[bytes]
) -> None:
    server.batch(inputs)


def test_saved_server_seeds_still_get_their_status(server: Http1Server) -> None:
    replay(SERVER_TARGET, lambda data: server.batch([data]))
