"""HTTP/2 frame layer for HBONE: encoders and an incremental parser (RFC 9113 section 4 and 6).

Pure code, no sockets. The parser never copies DATA payloads: an unpadded DATA frame is
reported as `DataChunk` events holding memoryview slices of the fed buffer, so a 1 MiB frame
costs a 9-byte header decode plus slicing. Every other frame is buffered whole and reported as
one `ControlFrame` (a rare padded DATA frame is buffered too, then reported as one DataChunk).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from testbed.netlab.errors import TestbedError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_SIZE = 9

DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA

DEFAULT_MAX_FRAME_SIZE = 16_384
DEFAULT_WINDOW_SIZE = 65_535
MAX_WINDOW_SIZE = 2**31 - 1
MAX_ALLOWED_FRAME_SIZE = 2**24 - 1

# length is 24 bits: written as a 16-bit high part and an 8-bit low part.
_HEADER = struct.Struct(">HBBBI")
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


class FrameError(TestbedError):
    """A connection error: the peer broke the framing rules. `code` is the GOAWAY error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def pack_header_into(buf: bytearray, length: int, ftype: int, flags: int, stream_id: int) -> None:
    """Write a frame header at the start of `buf` (used for DATA frames sent from headroom)."""
    _HEADER.pack_into(buf, 0, length >> 8, length & 0xFF, ftype, flags, stream_id)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


def settings_ack() -> bytes:
    return frame(SETTINGS, FLAG_ACK, 0)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code))


def ping(opaque: bytes) -> bytes:
    return frame(PING, 0, 0, opaque)


def ping_ack(opaque: bytes) -> bytes:
    return frame(PING, FLAG_ACK, 0, opaque)


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A HEADERS frame, plus CONTINUATION frames when the block exceeds the peer's frame size."""
    first, rest = block[:max_frame], block[max_frame:]
    end = FLAG_END_STREAM if end_stream else 0
    if not rest:
        return frame(HEADERS, end | FLAG_END_HEADERS, stream_id, first)
    parts = [frame(HEADERS, end, stream_id, first)]
    while rest:
        piece, rest = rest[:max_frame], rest[max_frame:]
        parts.append(frame(CONTINUATION, 0 if rest else FLAG_END_HEADERS, stream_id, piece))
    return b"".join(parts)


def parse_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % 6:
        raise FrameError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    return dict(_SETTING.iter_unpack(payload))


def parse_u32(payload: bytes, what: str) -> int:
    if len(payload) != 4:
        raise FrameError(FRAME_SIZE_ERROR, f"{what} payload must be 4 bytes")
    value: int = _U32.unpack(payload)[0]
    return value


def parse_goaway(payload: bytes) -> tuple[int, int]:
    """(last stream id, error code) of a GOAWAY payload (any debug data after them ignored)."""
    if len(payload) < _GOAWAY.size:
        raise FrameError(FRAME_SIZE_ERROR, "GOAWAY payload shorter than 8 bytes")
    last, code = _GOAWAY.unpack_from(payload)
    return last & 0x7FFFFFFF, code


def parse_window_increment(payload: bytes) -> int:
    return parse_u32(payload, "WINDOW_UPDATE") & 0x7FFFFFFF


def strip_padding(flags: int, payload: bytes) -> bytes:
    """The payload of a DATA/HEADERS frame without its padding (and HEADERS priority fields)."""
    if flags & FLAG_PADDED:
        if not payload or payload[0] >= len(payload):
            raise FrameError(PROTOCOL_ERROR, "padding longer than the frame")
        payload = payload[1 : len(payload) - payload[0]]
    return payload


@dataclass(slots=True)
class DataChunk:
    """Part of a DATA frame. `flow` is what it costs in flow control (`len(data)`, plus the
    padding of a padded frame); `end` is set on the last chunk of an END_STREAM frame."""

    stream_id: int
    data: memoryview
    flow: int
    end: bool


@dataclass(slots=True)
class ControlFrame:
    ftype: int
    flags: int
    stream_id: int
    payload: bytes


Event = DataChunk | ControlFrame


class FrameParser:
    """Incremental frame parser. `feed()` returns the events completed by the new bytes.

    The views in DataChunk events point into the fed buffer: the caller must not reuse that
    buffer while the views are alive (feed freshly allocated buffers).
    """

    def __init__(self, max_frame_size: int, expect_preface: bool) -> None:
        self.max_frame_size = max_frame_size
        self._preface_left = len(PREFACE) if expect_preface else 0
        self._header = bytearray()
        self._data_stream = 0
        self._data_left = 0
        self._data_end = False
        self._control: ControlFrame | None = None
        self._control_left = 0
        self._control_buf = bytearray()

    def feed(self, data: memoryview) -> list[Event]:
        events: list[Event] = []
        pos, size = 0, len(data)
        if self._preface_left:
            pos = self._consume_preface(data)
        while pos < size:
            if self._data_left:
                take = min(self._data_left, size - pos)
                self._data_left -= take
                end = self._data_end and not self._data_left
                events.append(DataChunk(self._data_stream, data[pos : pos + take], take, end))
                pos += take
            elif self._control is not None:
                take = min(self._control_left, size - pos)
                self._control_buf += data[pos : pos + take]
                pos += take
                self._control_left -= take
                if not self._control_left:
                    self._finish_control(events)
            elif not self._header and size - pos >= HEADER_SIZE:  # the common case: no copy
                self._start_frame(events, data[pos : pos + HEADER_SIZE])
                pos += HEADER_SIZE
            else:
                take = min(HEADER_SIZE - len(self._header), size - pos)
                self._header += data[pos : pos + take]
                pos += take
                if len(self._header) == HEADER_SIZE:
                    self._start_frame(events, self._header)
                    self._header = bytearray()
        return events

    def _consume_preface(self, data: memoryview) -> int:
        offset = len(PREFACE) - self._preface_left
        take = min(self._preface_left, len(data))
        if bytes(data[:take]) != PREFACE[offset : offset + take]:
            raise FrameError(PROTOCOL_ERROR, "bad HTTP/2 connection preface")
        self._preface_left -= take
        return take

    def _start_frame(self, events: list[Event], header: bytes | bytearray | memoryview) -> None:
        high, low, ftype, flags, stream_id = _HEADER.unpack(header)
        length = (high << 8) | low
        stream_id &= 0x7FFFFFFF
        if length > self.max_frame_size:
            raise FrameError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds the maximum")
        if ftype == DATA and not flags & FLAG_PADDED:
            if stream_id == 0:
                raise FrameError(PROTOCOL_ERROR, "DATA on stream 0")
            self._data_stream, self._data_left = stream_id, length
            self._data_end = bool(flags & FLAG_END_STREAM)
            if not length and self._data_end:
                events.append(DataChunk(stream_id, memoryview(b""), 0, True))
            return
        self._control = ControlFrame(ftype, flags, stream_id, b"")
        self._control_left = length
        if not length:
            self._finish_control(events)

    def _finish_control(self, events: list[Event]) -> None:
        control = self._control
        assert control is not None
        control.payload = bytes(self._control_buf)
        self._control_buf.clear()
        self._control = None
        if control.ftype != DATA:
            events.append(control)
            return
        # A padded DATA frame: flow control counts the whole frame, padding included.
        if control.stream_id == 0:
            raise FrameError(PROTOCOL_ERROR, "DATA on stream 0")
        body = strip_padding(control.flags, control.payload)
        end = bool(control.flags & FLAG_END_STREAM)
        events.append(DataChunk(control.stream_id, memoryview(body), len(control.payload), end))
