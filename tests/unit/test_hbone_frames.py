"""HBONE framing, flow control and request parsing: pure, no sockets."""

from __future__ import annotations

import hpack
import pytest
from hyperframe.frame import DataFrame, Frame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from testbed.mesh.hbone import frames as fr
from testbed.mesh.hbone.connect import (
    BadRequest,
    ConnectDecision,
    parse_authority,
    parse_request,
    request_headers,
    response_status,
    spiffe_parts,
)
from testbed.mesh.hbone.flow import ReceiveWindow, SendWindow


def feed_in_pieces(parser: fr.FrameParser, data: bytes, piece: int) -> list[fr.Event]:
    events: list[fr.Event] = []
    for start in range(0, len(data), piece):
        events.extend(parser.feed(memoryview(data[start : start + piece])))
    return events


def data_of(events: list[fr.Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, fr.DataChunk) and e.stream_id == stream_id
    )


def test_encoders_match_hyperframe() -> None:
    settings = fr.settings_frame({fr.SETTINGS_MAX_FRAME_SIZE: 1 << 20})
    assert settings == SettingsFrame(0, settings={fr.SETTINGS_MAX_FRAME_SIZE: 1 << 20}).serialize()
    assert fr.window_update(3, 1000) == WindowUpdateFrame(3, window_increment=1000).serialize()
    data = DataFrame(5, data=b"abc", flags=["END_STREAM"]).serialize()
    assert fr.frame(fr.DATA, fr.FLAG_END_STREAM, 5, b"abc") == data


def test_pack_header_into_headroom_builds_a_data_frame() -> None:
    buffer = bytearray(fr.HEADER_SIZE) + b"payload"
    fr.pack_header_into(buffer, 7, fr.DATA, 0, 9)
    parsed, length = Frame.parse_frame_header(memoryview(buffer[: fr.HEADER_SIZE]))
    assert (parsed.type, parsed.stream_id, length) == (fr.DATA, 9, 7)


@pytest.mark.parametrize("piece", [1, 7, 9, 4096, 1 << 20])
def test_parser_streams_data_across_arbitrary_splits(piece: int) -> None:
    payload = bytes(range(256)) * 300
    wire = (
        fr.PREFACE
        + fr.frame(fr.DATA, 0, 1, payload)
        + fr.window_update(0, 77)
        + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 3, b"tail")
    )
    events = feed_in_pieces(fr.FrameParser(1 << 20, expect_preface=True), wire, piece)
    assert data_of(events, 1) == payload
    assert data_of(events, 3) == b"tail"
    chunks = [e for e in events if isinstance(e, fr.DataChunk)]
    assert all(c.flow == len(c.data) for c in chunks)
    controls = [e for e in events if isinstance(e, fr.ControlFrame)]
    assert [(c.ftype, fr.parse_window_increment(c.payload)) for c in controls] == [
        (fr.WINDOW_UPDATE, 77)
    ]
    assert [c.stream_id for c in chunks if c.end] == [3]


def test_data_chunks_are_views_not_copies() -> None:
    wire = bytearray(fr.frame(fr.DATA, 0, 1, b"x" * 100))
    (chunk,) = fr.FrameParser(1 << 20, expect_preface=False).feed(memoryview(wire))
    assert isinstance(chunk, fr.DataChunk)
    wire[-1:] = b"y"
    assert bytes(chunk.data)[-1:] == b"y"


def test_padded_data_reports_padding_for_flow_control() -> None:
    padded = DataFrame(1, data=b"hello", pad_length=10, flags=["END_STREAM", "PADDED"]).serialize()
    (chunk,) = fr.FrameParser(1 << 20, expect_preface=False).feed(memoryview(padded))
    assert isinstance(chunk, fr.DataChunk)
    assert (bytes(chunk.data), chunk.flow, chunk.end) == (b"hello", 16, True)


def test_empty_data_with_end_stream() -> None:
    (chunk,) = fr.FrameParser(1 << 20, expect_preface=False).feed(
        memoryview(fr.frame(fr.DATA, fr.FLAG_END_STREAM, 1))
    )
    assert isinstance(chunk, fr.DataChunk)
    assert (len(chunk.data), chunk.flow, chunk.end) == (0, 0, True)


def test_parser_rejects_bad_preface_and_oversized_frames() -> None:
    with pytest.raises(fr.FrameError) as bad_preface:
        fr.FrameParser(1 << 20, expect_preface=True).feed(memoryview(b"GET / HTTP/1.1\r\n"))
    assert bad_preface.value.code == fr.PROTOCOL_ERROR
    with pytest.raises(fr.FrameError) as too_big:
        fr.FrameParser(16384, expect_preface=False).feed(
            memoryview(fr.frame(fr.DATA, 0, 1, b"x" * 16385))
        )
    assert too_big.value.code == fr.FRAME_SIZE_ERROR
    with pytest.raises(fr.FrameError):
        fr.FrameParser(16384, expect_preface=False).feed(memoryview(fr.frame(fr.DATA, 0, 0, b"x")))


def test_headers_split_into_continuations_round_trip() -> None:
    block = hpack.Encoder().encode([(":method", "CONNECT"), ("baggage", "x" * 100)])
    wire = fr.headers_frames(1, block, end_stream=False, max_frame=16)
    events = fr.FrameParser(1 << 20, expect_preface=False).feed(memoryview(wire))
    controls = [e for e in events if isinstance(e, fr.ControlFrame)]
    assert controls[0].ftype == fr.HEADERS and not controls[0].flags & fr.FLAG_END_HEADERS
    assert all(c.ftype == fr.CONTINUATION for c in controls[1:])
    assert controls[-1].flags & fr.FLAG_END_HEADERS
    assert b"".join(c.payload for c in controls) == block
    single = HeadersFrame(1, data=block, flags=["END_HEADERS"]).serialize()
    assert fr.headers_frames(1, block, end_stream=False, max_frame=1 << 20) == single


def test_settings_parsing_and_errors() -> None:
    payload = fr.settings_frame({fr.SETTINGS_INITIAL_WINDOW_SIZE: 4 << 20})[fr.HEADER_SIZE :]
    assert fr.parse_settings(payload) == {fr.SETTINGS_INITIAL_WINDOW_SIZE: 4 << 20}
    with pytest.raises(fr.FrameError):
        fr.parse_settings(b"\x00" * 5)
    with pytest.raises(fr.FrameError):
        fr.parse_window_increment(b"\x00\x01")


def test_receive_window_batches_updates() -> None:
    window = ReceiveWindow(4 << 20, threshold=1 << 20)
    window.receive(3 << 20)
    assert window.available == 1 << 20
    assert window.consume(512 << 10) == 0  # below the threshold: no WINDOW_UPDATE yet
    assert window.consume(512 << 10) == 1 << 20  # one update for two frames' worth
    assert window.available == 2 << 20
    with pytest.raises(fr.FrameError) as overrun:
        window.receive((2 << 20) + 1)
    assert overrun.value.code == fr.FLOW_CONTROL_ERROR


def test_send_window_limits() -> None:
    window = SendWindow(65_535)
    window.spend(65_535)
    window.grow(10)
    assert window.available == 10
    window.grow(-20)  # a SETTINGS_INITIAL_WINDOW_SIZE decrease may make it negative
    assert window.available == -10
    with pytest.raises(fr.FrameError):
        window.grow(0)
    with pytest.raises(fr.FrameError):
        SendWindow(fr.MAX_WINDOW_SIZE).grow(1)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [("10.0.0.1:80", ("10.0.0.1", 80)), ("[fd00::1]:8080", ("fd00::1", 8080))],
)
def test_parse_authority(authority: str, expected: tuple[str, int]) -> None:
    assert parse_authority(authority) == expected


@pytest.mark.parametrize(
    "authority", ["", "example.com:80", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "fd00::1:80"]
)
def test_parse_authority_rejects(authority: str) -> None:
    with pytest.raises(BadRequest):
        parse_authority(authority)


def test_request_headers_round_trip() -> None:
    headers = request_headers("10.0.0.2:80", ("10.0.0.1", 5555), {"Traceparent": "00-1-2-01"})
    request = parse_request(headers, "spiffe://cluster.local/ns/a/sa/a", ("10.0.0.1", 1))
    assert request.authority == ("10.0.0.2", 80)
    assert request.forwarded_for == ("10.0.0.1", 5555)
    assert request.traceparent == "00-1-2-01"


@pytest.mark.parametrize(
    "headers",
    [
        [(":method", "GET"), (":authority", "10.0.0.2:80"), (":scheme", "https"), (":path", "/")],
        [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), (":protocol", "websocket")],
        [(":method", "CONNECT")],
    ],
)
def test_parse_request_rejects_non_plain_connect(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest):
        parse_request(headers, None, ("10.0.0.1", 1))


def test_decisions_statuses_and_spiffe() -> None:
    assert ConnectDecision.reject(401).status == 401
    with pytest.raises(ValueError):
        ConnectDecision.reject(200)
    assert response_status([(":status", "503")]) == 503
    assert spiffe_parts("spiffe://cluster.local/ns/a/sa/b") == ("cluster.local", "a", "b")
    assert spiffe_parts("spiffe://cluster.local/a/b") is None
