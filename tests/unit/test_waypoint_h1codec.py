"""HTTP/1.1 heads and framing for the waypoint (pure)."""

from __future__ import annotations

import pytest

from testbed.mesh.waypoint.h1codec import (
    ParseError,
    chunk_size,
    encode_head,
    framing,
    keep_alive,
    parse_request_head,
    parse_response_head,
)


def test_request_head_is_parsed_with_lowercase_names() -> None:
    head = parse_request_head(b"\r\nGET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Token:  t 1 \r\n\r\n")
    assert (head.method, head.target, head.version) == ("GET", "/a?b=1", "1.1")
    assert head.headers == [("host", "x"), ("x-token", "t 1")]
    assert head.keep_alive


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /x HTTP/1.1 extra\r\nhost: x\r\n\r\n", 400),  # bad request line
        (b"GET /x\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /x HTTP/2.0\r\nhost: x\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nhost: x\r\n folded\r\n\r\n", 400),  # obsolete folding
        (b"GET /x HTTP/1.1\r\nhost : x\r\n\r\n", 400),  # space before the colon
        (b"GET /x HTTP/1.1\r\nhost: x\nx: y\r\n\r\n", 400),  # bare LF
    ],
)
def test_malformed_request_heads(raw: bytes, status: int) -> None:
    with pytest.raises(ParseError) as caught:
        parse_request_head(raw)
    assert caught.value.status == status


def test_response_head_and_bad_status_line() -> None:
    head = parse_response_head(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
    assert (head.status, head.headers) == (503, [("content-length", "0")])
    assert parse_response_head(b"HTTP/1.0 200\r\n\r\n").status == 200
    with pytest.raises(ParseError) as caught:
        parse_response_head(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert caught.value.status == 502


def test_framing_rules() -> None:
    assert framing([], is_request=True) == ("none", 0)
    assert framing([], is_request=False) == ("close", 0)
    assert framing([("content-length", "12")], is_request=True) == ("length", 12)
    assert framing([("content-length", "5"), ("content-length", "5")], is_request=True)[1] == 5
    assert framing([("transfer-encoding", "Chunked")], is_request=True) == ("chunked", 0)
    for bad in (
        [("content-length", "5"), ("content-length", "6")],
        [("content-length", "-1")],
        [("transfer-encoding", "chunked"), ("content-length", "3")],
    ):
        with pytest.raises(ParseError):
            framing(bad, is_request=True)
    with pytest.raises(ParseError) as caught:
        framing([("transfer-encoding", "gzip, chunked")], is_request=True)
    assert caught.value.status == 501


def test_keep_alive_and_chunk_sizes_and_encoding() -> None:
    assert not keep_alive("1.1", [("connection", "Close")])
    assert not keep_alive("1.0", [])
    assert keep_alive("1.0", [("connection", "keep-alive")])
    assert chunk_size(b"1a;ext=1") == 26
    with pytest.raises(ParseError):
        chunk_size(b"zz")
    assert encode_head("HTTP/1.1 200 OK", [("a", "b")], 3, close=True) == (
        b"HTTP/1.1 200 OK\r\na: b\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"
    )
