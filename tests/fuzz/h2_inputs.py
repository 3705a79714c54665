"""Hypothesis strategies for hostile HTTP/2 client byte streams (shared by the waypoint
and HBONE targets): a preface (sometimes broken), then frames of every type with lengths,
flags and stream ids right or wrong, window overflows, HPACK bombs, CONTINUATION floods."""

from __future__ import annotations

from fuzz_support import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    h2_frame,
)
from hypothesis import strategies as st

# HPACK: indexed :method GET (0x82), a literal with incremental indexing of a new name
_HPACK_GET = b"\x82\x86\x84\x41\x01c"  # :method GET, :scheme http, :path /, :authority c
_HPACK_CONNECT = b"\x02\x07CONNECT\x01\x0e127.0.0.1:9999"  # :method CONNECT, :authority


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """Literal header field with incremental indexing, new name (RFC 7541 6.2.1); short
    strings only (7-bit length prefix)."""
    return (
        b"\x40" + bytes([len(name) & 0x7F]) + name[:127] + bytes([len(value) & 0x7F]) + value[:127]
    )


_hpack_blocks = st.one_of(
    st.just(_HPACK_GET),
    st.builds(  # a request with one more field of any bytes (not UTF-8, CR/LF, NUL...)
        lambda n, v: _HPACK_GET + _hpack_literal(n, v), st.binary(max_size=8), st.binary(max_size=8)
    ),
    st.just(_HPACK_CONNECT),
    st.binary(max_size=40),  # garbage: bad indexes, bad Huffman, truncated integers
    st.builds(
        lambda n: _hpack_literal(b"x-big", b"v" * 100) + b"\xbe" * n,  # index 62 over and over
        st.integers(1, 2000),
    ),  # an HPACK bomb: a small block decoding to a huge header list
    st.just(b"\x3f\xe1\xff\xff\xff\x0f"),  # dynamic table size update to 2^32
    st.just(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"),  # an integer that never ends
)
_stream_ids = st.one_of(
    st.sampled_from([0, 1, 1, 3, 2, 0x7FFFFFFF, 0x80000001]), st.integers(0, 0xFFFFFFFF)
)
_flags = st.one_of(
    st.sampled_from([0, END_STREAM, END_HEADERS, END_STREAM | END_HEADERS, 0x8, 0x20]),
    st.integers(0, 255),
)


def _settings_payload(pairs: list[tuple[int, int]]) -> bytes:
    return b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)


_settings = st.lists(
    st.tuples(
        st.integers(0, 9),
        st.one_of(
            st.sampled_from([0, 1, 2, 16383, 16384, 16777215, 2**31 - 1, 2**31, 2**32 - 1]),
            st.integers(0, 2**32 - 1),
        ),
    ),
    max_size=4,
).map(_settings_payload)

_payload_of = {
    DATA: st.binary(max_size=64),
    HEADERS: _hpack_blocks,
    PRIORITY: st.binary(min_size=5, max_size=5) | st.binary(max_size=8),
    RST_STREAM: st.integers(0, 0xFFFFFFFF).map(lambda c: c.to_bytes(4, "big"))
    | st.binary(max_size=6),
    SETTINGS: _settings | st.binary(max_size=13),
    PUSH_PROMISE: st.binary(max_size=12),
    PING: st.binary(min_size=8, max_size=8) | st.binary(max_size=12),
    GOAWAY: st.binary(min_size=8, max_size=16) | st.binary(max_size=7),
    WINDOW_UPDATE: st.one_of(
        st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]).map(lambda n: n.to_bytes(4, "big")),
        st.binary(max_size=6),
    ),
    CONTINUATION: _hpack_blocks,
}


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.one_of(st.sampled_from(sorted(_payload_of)), st.integers(10, 255)))
    payload = draw(_payload_of.get(kind, st.binary(max_size=16)))
    length = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFFFF)))
    frame: bytes = h2_frame(kind, draw(_flags), draw(_stream_ids), payload, length)
    return frame


def _continuation_flood(count: int) -> bytes:
    """HEADERS without END_HEADERS, then `count` CONTINUATIONs that never end the block."""
    first: bytes = h2_frame(HEADERS, END_STREAM, 1, _HPACK_GET)
    flood: bytes = h2_frame(CONTINUATION, 0, 1, b"\x40\x01a\x01b") * count
    return first + flood


def _open_then_reset(extra: bytes) -> bytes:
    opened: bytes = (
        h2_frame(HEADERS, END_HEADERS, 1, _HPACK_CONNECT)
        + h2_frame(DATA, 0, 1, b"half")
        + h2_frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big"))
        + extra
    )
    return opened


_window_overflow = st.just(
    h2_frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")) * 2
) | st.just(
    h2_frame(HEADERS, END_HEADERS, 1, _HPACK_GET)
    + h2_frame(WINDOW_UPDATE, 0, 1, (2**31 - 1).to_bytes(4, "big")) * 2
)
_preface = st.one_of(
    st.just(PREFACE + h2_frame(SETTINGS, 0, 0, b"")),
    st.just(PREFACE),
    st.just(PREFACE + h2_frame(SETTINGS, 0, 0, b"")),
    st.binary(max_size=30),
    st.just(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
)
_body = st.one_of(
    st.lists(_frame(), max_size=6).map(b"".join),
    st.integers(1, 3000).map(_continuation_flood),
    _window_overflow,
    st.lists(_frame(), max_size=2).map(b"".join).map(_open_then_reset),
)


def h2_inputs() -> st.SearchStrategy[bytes]:
    return st.builds(lambda p, b: p + b, _preface, _body)
