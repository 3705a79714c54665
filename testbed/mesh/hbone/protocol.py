"""The HBONE HTTP/2 CONNECT state machine, sans I/O (in the style of the `h2` library).

    proto = HboneProtocol(client_side=True)
    proto.initiate_connection()
    stream_id = proto.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.7:8080")])
    wire.send(proto.data_to_send())
    for event in proto.receive_data(wire.recv()):   # ResponseReceived, DataReceived, ...
        ...

Bytes in, events and bytes out, no sockets: framing, SETTINGS, PING, GOAWAY, HEADERS +
CONTINUATION (HPACK via the `hpack` package), stream states, resets and both levels of flow
control. A peer breaking the rules raises `FrameError` from `receive_data` after a GOAWAY with
its code has been queued. The bytes are plaintext HTTP/2; the drivers put TLS around them.

Each side announces and enforces what Istio's ztunnel does (`Settings.server()`,
`Settings.client()`): a server refuses a stream beyond its 200 concurrent ones with
RST_STREAM REFUSED_STREAM; a header list over the limit (64 KiB server, 16 KiB client) is
refused as the Rust h2 crate refuses it (431 and RST_STREAM PROTOCOL_ERROR from a server;
RST_STREAM PROTOCOL_ERROR from a client). The PING keepalive runs on the time the driver
passes to `keepalive(now)`; there is no clock in here.

Zero copies on the data path: `DataReceived.data` is a view of the buffer given to
`receive_data`, and `send_data_from_headroom` frames a payload in place behind 9 bytes of
headroom. `chunks_to_send()` hands the output over as a few pieces (control frames joined
into one, WINDOW_UPDATEs included) so a driver can encrypt each without joining them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import hpack

from testbed.netlab.errors import TestbedError

from . import events as ev
from . import frames as fr
from .flow import ReceiveWindow, SendWindow, StreamReceiver
from .timers import PING_INTERVAL, PING_TIMEOUT

STREAM_WINDOW = 4 << 20  # Istio ztunnel's stream window
CONNECTION_WINDOW = 16 << 20  # ... and its connection window
STREAM_BUFFER_LIMIT = 4 << 20  # bytes a stream may hold for a slow app beyond its window
CREDIT_THRESHOLD = 1 << 20  # batch WINDOW_UPDATEs: at most one per MiB per stream
MAX_FRAME_SIZE = 1 << 20
# Istio ztunnel's server (h2 crate builder): at most 200 streams, 64 KiB of headers; its client
# takes 16 KiB of headers and no push.
SERVER_MAX_CONCURRENT_STREAMS = 200
SERVER_MAX_HEADER_LIST_SIZE = 64 << 10
CLIENT_MAX_HEADER_LIST_SIZE = 16 << 10
# A header list this many times over the limit is not decoded at all (an HPACK bomb): the
# decoder gives up and the connection fails with COMPRESSION_ERROR.
HEADER_DECODE_FACTOR = 4
STATUS_HEADERS_TOO_LARGE = "431"
_LAST_STREAM_ID = 2**31 - 1
_PING_OPAQUE = struct.Struct(">Q")

Chunk = bytes | memoryview


@dataclass(slots=True)
class StreamState:
    id: int
    send: SendWindow
    receive: StreamReceiver
    sent_end: bool = False
    received_end: bool = False


class PeerUnresponsive(TestbedError, ConnectionError):
    """No PING ACK came within the keepalive timeout: the peer is taken for dead."""


@dataclass
class Settings:
    """What this side announces and enforces, and its keepalive (the defaults are Istio's
    ztunnel windows; `server()` and `client()` add each side's limits)."""

    stream_window: int = STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    max_frame_size: int = MAX_FRAME_SIZE
    stream_buffer_limit: int = STREAM_BUFFER_LIMIT
    credit_threshold: int = CREDIT_THRESHOLD
    max_concurrent_streams: int | None = None  # streams the peer may open (None: no limit)
    max_header_list_size: int | None = None  # RFC 9113 size: name + value + 32 per field
    ping_interval: float | None = PING_INTERVAL  # None: no keepalive
    ping_timeout: float = PING_TIMEOUT
    extra: dict[int, int] = field(default_factory=dict)

    @classmethod
    def server(cls, **overrides: Any) -> Settings:
        limits = cls(
            max_concurrent_streams=SERVER_MAX_CONCURRENT_STREAMS,
            max_header_list_size=SERVER_MAX_HEADER_LIST_SIZE,
        )
        return replace(limits, **overrides)

    @classmethod
    def client(cls, **overrides: Any) -> Settings:
        return replace(cls(max_header_list_size=CLIENT_MAX_HEADER_LIST_SIZE), **overrides)


class HboneProtocol:
    def __init__(self, client_side: bool, settings: Settings | None = None) -> None:
        self.client_side = client_side
        self.settings = settings or (Settings.client() if client_side else Settings.server())
        self.streams: dict[int, StreamState] = {}
        self.peer_max_frame = fr.DEFAULT_MAX_FRAME_SIZE
        self.peer_initial_window = fr.DEFAULT_WINDOW_SIZE
        self.peer_max_streams = _LAST_STREAM_ID
        self.goaway_received = False
        self.goaway_code: int | None = None  # the error code of the peer's GOAWAY
        self.closed = False  # we sent GOAWAY
        self._parser = fr.FrameParser(self.settings.max_frame_size, expect_preface=not client_side)
        self._send_window = SendWindow(fr.DEFAULT_WINDOW_SIZE)
        window = self.settings.connection_window
        self._receive_window = ReceiveWindow(window, window // 4)
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._header_limit = self.settings.max_header_list_size
        if self._header_limit is not None:
            self._decoder.max_header_list_size = self._header_limit * HEADER_DECODE_FACTOR
        self._header_block: tuple[int, int, bytearray] | None = None  # awaiting CONTINUATION
        self._next_stream_id = 1
        self._last_peer_stream = 0
        self._chunks: list[Chunk] = []
        self._control = bytearray()  # small frames, joined into one chunk
        self._credit_due: set[int] = set()  # streams with a WINDOW_UPDATE to write at flush
        self._events: list[ev.Event] = []
        self._ping_due: float | None = None  # when the next keepalive PING goes out
        self._ping_sent: float | None = None  # when the unanswered PING went out
        self._ping_acked = False  # its ACK came: the next keepalive() restarts the interval
        self._pings = 0

    # -- output -------------------------------------------------------------------------
    def initiate_connection(self) -> None:
        if self.client_side:
            self._control += fr.PREFACE
        s = self.settings
        announced = {
            fr.SETTINGS_INITIAL_WINDOW_SIZE: s.stream_window,
            fr.SETTINGS_MAX_FRAME_SIZE: s.max_frame_size,
            **s.extra,
        }
        if self.client_side:
            announced[fr.SETTINGS_ENABLE_PUSH] = 0
        if s.max_concurrent_streams is not None:
            announced[fr.SETTINGS_MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        if s.max_header_list_size is not None:
            announced[fr.SETTINGS_MAX_HEADER_LIST_SIZE] = s.max_header_list_size
        self._control += fr.settings_frame(dict(sorted(announced.items())))  # h2's order
        increment = self.settings.connection_window - fr.DEFAULT_WINDOW_SIZE
        if increment > 0:
            self._control += fr.window_update(0, increment)

    def chunks_to_send(self) -> list[Chunk]:
        """The output so far, in order, as few pieces; pending stream credit is written first."""
        self._write_credit()
        self._cut_control()
        chunks, self._chunks = self._chunks, []
        return chunks

    def data_to_send(self) -> bytes:
        return b"".join(self.chunks_to_send())

    def _cut_control(self) -> None:
        if self._control:
            self._chunks.append(bytes(self._control))
            self._control.clear()

    def _write_credit(self) -> None:
        for stream_id in self._credit_due:
            stream = self.streams.get(stream_id)
            if stream is not None and not stream.received_end:
                increment = stream.receive.credit()
                if increment:
                    self._control += fr.window_update(stream_id, increment)
        self._credit_due.clear()

    # -- streams ------------------------------------------------------------------------
    def can_open_stream(self) -> bool:
        return (
            self.client_side
            and not self.goaway_received
            and not self.closed
            and len(self.streams) < self.peer_max_streams
            and self._next_stream_id < _LAST_STREAM_ID
        )

    def open_stream(self, headers: ev.Headers) -> int:
        """Client: send a request (HEADERS without END_STREAM) on a new stream."""
        if not self.client_side:
            raise RuntimeError("only a client opens streams")
        stream_id, self._next_stream_id = self._next_stream_id, self._next_stream_id + 2
        self._add_stream(stream_id)
        self.send_headers(stream_id, headers, end_stream=False)
        return stream_id

    def _add_stream(self, stream_id: int) -> StreamState:
        s = self.settings
        receiver = StreamReceiver(s.stream_window, s.stream_buffer_limit, s.credit_threshold)
        stream = StreamState(stream_id, SendWindow(self.peer_initial_window), receiver)
        self.streams[stream_id] = stream
        return stream

    def send_headers(self, stream_id: int, headers: ev.Headers, end_stream: bool) -> None:
        block = self._encoder.encode(headers)
        self._control += fr.headers_frames(stream_id, block, end_stream, self.peer_max_frame)
        if end_stream:
            self._local_end(stream_id)

    def sendable(self, stream_id: int) -> int:
        """How many payload bytes one DATA frame on `stream_id` may carry now."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.sent_end:
            return 0
        return max(
            0,
            min(
                stream.send.available,
                self._send_window.available,
                self.peer_max_frame,
                self.settings.max_frame_size,
            ),
        )

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as the windows allow (in frames); returns the count sent."""
        sent = 0
        while sent < len(data) and (allowed := self.sendable(stream_id)) > 0:
            piece = data[sent : sent + allowed]
            self._spend(stream_id, len(piece))
            self._control += fr.frame(fr.DATA, 0, stream_id, bytes(piece))
            sent += len(piece)
        return sent

    def send_data_from_headroom(self, stream_id: int, buffer: bytearray, length: int) -> int:
        """Frame `buffer[9:9+length]` in place, its header in `buffer[:9]`; returns the count
        sent (less than `length` when the windows shrank: the caller keeps the rest).

        The frame is queued as a view of `buffer`: take the output before reusing it."""
        allowed = min(length, self.sendable(stream_id))
        if allowed <= 0:
            return 0
        self._spend(stream_id, allowed)
        fr.pack_header_into(buffer, allowed, fr.DATA, 0, stream_id)
        self._cut_control()
        self._chunks.append(memoryview(buffer)[: fr.HEADER_SIZE + allowed])
        return allowed

    def _spend(self, stream_id: int, length: int) -> None:
        self.streams[stream_id].send.spend(length)
        self._send_window.spend(length)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (an empty DATA frame with END_STREAM)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.sent_end:
            return
        self._control += fr.frame(fr.DATA, fr.FLAG_END_STREAM, stream_id)
        self._local_end(stream_id)

    def _local_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.sent_end = True
            if stream.received_end:
                del self.streams[stream_id]

    def reset_stream(self, stream_id: int, code: int = fr.CONNECT_ERROR) -> None:
        """Abort the stream (RST_STREAM); later frames for it are dropped."""
        if self.streams.pop(stream_id, None) is not None:
            self._control += fr.rst_stream(stream_id, code)

    def forget_stream(self, stream_id: int) -> None:
        """Drop the stream's state without telling the peer (its answer carried END_STREAM)."""
        self.streams.pop(stream_id, None)

    def consumed(self, stream_id: int, length: int) -> None:
        """`length` bytes of the stream's DATA left our buffers: its credit may be returned."""
        stream = self.streams.get(stream_id)
        if stream is not None and length:
            stream.receive.consume(min(length, stream.receive.buffered))
            self._credit_due.add(stream_id)

    def close(self, code: int = fr.NO_ERROR) -> None:
        if not self.closed:
            self.closed = True
            self._control += fr.goaway(self._last_peer_stream, code)

    # -- keepalive ----------------------------------------------------------------------
    def keepalive(self, now: float) -> float | None:
        """Drive the PING keepalive at time `now`; returns when to call again (None: never).

        Call it once the connection is up, when the returned time comes, and after a
        `PingAcknowledged` event. As in Istio's ztunnel, a PING goes out `ping_interval` after
        the start and after each ACK; an ACK later than `ping_timeout` raises PeerUnresponsive
        (a GOAWAY NO_ERROR is queued, as ztunnel's server sends it)."""
        interval = self.settings.ping_interval
        if interval is None or self.closed:
            return None
        if self._ping_acked or (self._ping_due is None and self._ping_sent is None):
            self._ping_acked, self._ping_sent = False, None
            self._ping_due = now + interval
        if self._ping_sent is not None:
            deadline = self._ping_sent + self.settings.ping_timeout
            if now >= deadline:
                self.close(fr.NO_ERROR)
                raise PeerUnresponsive(
                    f"no PING ACK within {self.settings.ping_timeout:g} s: the peer is gone"
                )
            return deadline
        assert self._ping_due is not None
        if now < self._ping_due:
            return self._ping_due
        self._pings += 1
        self._control += fr.ping(_PING_OPAQUE.pack(self._pings))
        self._ping_sent, self._ping_due = now, None
        return now + self.settings.ping_timeout

    # -- input --------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Parse `data`; returns what happened. Raises FrameError (GOAWAY queued)."""
        events: list[ev.Event] = []
        self._events = events
        try:
            for item in self._parser.feed(memoryview(data)):
                if self._header_block is not None and not (
                    isinstance(item, fr.ControlFrame) and item.ftype == fr.CONTINUATION
                ):
                    raise fr.FrameError(fr.PROTOCOL_ERROR, "expected CONTINUATION")
                if isinstance(item, fr.DataChunk):
                    self._on_data(item)
                else:
                    handler = self._handlers.get(item.ftype)
                    if handler is not None:
                        handler(self, item)
        except fr.FrameError as exc:
            self.close(exc.code)
            raise
        return events

    def _on_data(self, chunk: fr.DataChunk) -> None:
        # The connection window comes back as bytes arrive; a stream's as StreamReceiver says.
        self._receive_window.receive(chunk.flow)
        increment = self._receive_window.consume(chunk.flow)
        if increment:
            self._control += fr.window_update(0, increment)
        stream = self.streams.get(chunk.stream_id)
        if stream is None or stream.received_end:
            return  # a stream we reset or finished: drop the bytes
        stream.receive.receive(chunk.flow)
        padding = chunk.flow - len(chunk.data)
        if padding:
            stream.receive.consume(padding)
        self._credit_due.add(stream.id)
        if chunk.data:
            self._events.append(ev.DataReceived(stream.id, chunk.data))
        if chunk.end:
            self._remote_end(stream)

    def _remote_end(self, stream: StreamState) -> None:
        stream.received_end = True
        self._events.append(ev.StreamEnded(stream.id))
        if stream.sent_end:
            del self.streams[stream.id]

    def _on_headers_frame(self, frame: fr.ControlFrame) -> None:
        if frame.stream_id == 0:
            raise fr.FrameError(fr.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = fr.strip_padding(frame.flags, frame.payload)
        if frame.flags & fr.FLAG_PRIORITY:
            block = block[5:]
        self._header_block = (frame.stream_id, frame.flags, bytearray(block))
        if frame.flags & fr.FLAG_END_HEADERS:
            self._finish_header_block()

    def _on_continuation(self, frame: fr.ControlFrame) -> None:
        if self._header_block is None or self._header_block[0] != frame.stream_id:
            raise fr.FrameError(fr.PROTOCOL_ERROR, "unexpected CONTINUATION")
        block = self._header_block[2]
        limit = self._header_limit
        if limit is not None and len(block) + len(frame.payload) > limit:
            # h2's bound on buffering a header block: past the limit, the connection goes
            raise fr.FrameError(fr.COMPRESSION_ERROR, "header block over the size limit")
        block.extend(frame.payload)
        if frame.flags & fr.FLAG_END_HEADERS:
            self._finish_header_block()

    def _finish_header_block(self) -> None:
        assert self._header_block is not None
        stream_id, flags, block = self._header_block
        self._header_block = None
        try:  # decoded even for a stream we forgot: the HPACK state must advance
            headers = [(str(n), str(v)) for n, v in self._decoder.decode(bytes(block))]
        except hpack.HPACKError as exc:
            raise fr.FrameError(fr.COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        end = bool(flags & fr.FLAG_END_STREAM)
        limit = self._header_limit
        if limit is not None and header_list_size(headers) > limit:
            self._refuse_headers(stream_id)
        elif self.client_side:
            self._on_response(stream_id, headers, end)
        else:
            self._on_request(stream_id, headers, end)

    def _refuse_headers(self, stream_id: int) -> None:
        """A header list over our limit: a server answers a new request 431; either side then
        resets the stream with PROTOCOL_ERROR (what the h2 crate does)."""
        if self.client_side:
            if self.streams.pop(stream_id, None) is not None:
                self._control += fr.rst_stream(stream_id, fr.PROTOCOL_ERROR)
                self._events.append(ev.StreamReset(stream_id, fr.PROTOCOL_ERROR))
            return
        if not self._new_peer_stream(stream_id):
            return  # trailers: the stream is reset if we still know it
        answer = self._encoder.encode([(":status", STATUS_HEADERS_TOO_LARGE)])
        self._control += fr.headers_frames(stream_id, answer, True, self.peer_max_frame)
        self._control += fr.rst_stream(stream_id, fr.PROTOCOL_ERROR)

    def _new_peer_stream(self, stream_id: int) -> bool:
        """Whether `stream_id` opens a new stream (else: trailers, or a stream we answered)."""
        if stream_id % 2 == 0:
            raise fr.FrameError(fr.PROTOCOL_ERROR, f"client opened even stream {stream_id}")
        if stream_id <= self._last_peer_stream:
            return False
        self._last_peer_stream = stream_id
        return True

    def _on_request(self, stream_id: int, headers: ev.Headers, end: bool) -> None:
        if not self._new_peer_stream(stream_id):
            return  # trailers, or a late frame on a stream we already answered
        limit = self.settings.max_concurrent_streams
        if limit is not None and len(self.streams) >= limit:
            self._control += fr.rst_stream(stream_id, fr.REFUSED_STREAM)
            return
        stream = self._add_stream(stream_id)
        self._events.append(ev.RequestReceived(stream_id, headers, end))
        if end:
            self._remote_end(stream)

    def _on_response(self, stream_id: int, headers: ev.Headers, end: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self._events.append(ev.ResponseReceived(stream_id, headers, end))
        if end:
            self._remote_end(stream)

    def _on_rst_stream(self, frame: fr.ControlFrame) -> None:
        code = fr.parse_u32(frame.payload, "RST_STREAM")
        if self.streams.pop(frame.stream_id, None) is not None:
            self._events.append(ev.StreamReset(frame.stream_id, code))

    def _on_settings(self, frame: fr.ControlFrame) -> None:
        if frame.flags & fr.FLAG_ACK:
            return
        for key, value in fr.parse_settings(frame.payload).items():
            self._apply_setting(key, value)
        self._control += fr.settings_ack()
        self._events.append(ev.WindowOpened(0))

    def _apply_setting(self, key: int, value: int) -> None:
        if key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
            if value > fr.MAX_WINDOW_SIZE:
                raise fr.FrameError(fr.FLOW_CONTROL_ERROR, "initial window too large")
            delta, self.peer_initial_window = value - self.peer_initial_window, value
            for stream in self.streams.values():
                stream.send.available += delta
        elif key == fr.SETTINGS_MAX_FRAME_SIZE:
            if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_ALLOWED_FRAME_SIZE:
                raise fr.FrameError(fr.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
            self.peer_max_frame = value
        elif key == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value
        elif key == fr.SETTINGS_ENABLE_PUSH and value not in (0, 1):
            raise fr.FrameError(fr.PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")

    def _on_ping(self, frame: fr.ControlFrame) -> None:
        if frame.stream_id != 0:
            raise fr.FrameError(fr.PROTOCOL_ERROR, "PING on a stream")
        if len(frame.payload) != 8:
            raise fr.FrameError(fr.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
        if not frame.flags & fr.FLAG_ACK:
            self._control += fr.ping_ack(frame.payload)
        elif self._ping_sent is not None and frame.payload == _PING_OPAQUE.pack(self._pings):
            self._ping_acked = True
            self._events.append(ev.PingAcknowledged())

    def _on_goaway(self, frame: fr.ControlFrame) -> None:
        self.goaway_received = True
        last, code = fr.parse_goaway(frame.payload)
        self.goaway_code = code
        self._events.append(ev.ConnectionTerminated(code, last))

    def _on_window_update(self, frame: fr.ControlFrame) -> None:
        increment = fr.parse_window_increment(frame.payload)
        if frame.stream_id == 0:
            self._send_window.grow(increment)
            self._events.append(ev.WindowOpened(0))
            return
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            stream.send.grow(increment)
            self._events.append(ev.WindowOpened(frame.stream_id))

    def _on_push_promise(self, frame: fr.ControlFrame) -> None:
        raise fr.FrameError(fr.PROTOCOL_ERROR, "PUSH_PROMISE is not allowed")

    _handlers: ClassVar[dict[int, Callable[[HboneProtocol, fr.ControlFrame], None]]] = {
        fr.HEADERS: _on_headers_frame,
        fr.CONTINUATION: _on_continuation,
        fr.RST_STREAM: _on_rst_stream,
        fr.SETTINGS: _on_settings,
        fr.PING: _on_ping,
        fr.GOAWAY: _on_goaway,
        fr.WINDOW_UPDATE: _on_window_update,
        fr.PUSH_PROMISE: _on_push_promise,
    }


def header_list_size(headers: ev.Headers) -> int:
    """The size SETTINGS_MAX_HEADER_LIST_SIZE limits (RFC 9113 section 6.5.2)."""
    return sum(len(name.encode()) + len(value.encode()) + 32 for name, value in headers)
