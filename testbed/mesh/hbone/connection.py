"""One HBONE connection: TLS (SSLObject over MemoryBIOs) + the HTTP/2 frame layer + streams.

`TunnelConnection` is an asyncio protocol on the raw TCP socket, shared by the client and the
server subclasses. It reads ciphertext into a 1 MiB buffer, decrypts everything available in
one go, and parses frames over the result; DATA payloads go to the streams as memoryview
slices. HPACK is done by the `hpack` package (the one `h2` uses). Any protocol error closes
this connection only, with one log line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import ClassVar, cast

import hpack

from . import frames as fr
from .connect import Address
from .flow import ReceiveWindow, SendWindow
from .memory import BufferRecycler
from .stream import TunnelStream
from .tls import ALPN_H2, TlsSession

STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
MAX_FRAME_SIZE = 1 << 20
READ_BUFFER_SIZE = 1 << 20
WRITE_BUFFER_HIGH = 8 << 20
HANDSHAKE_TIMEOUT = 10.0

log = logging.getLogger("testbed.mesh.hbone")

OUR_SETTINGS = {
    fr.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    fr.SETTINGS_MAX_FRAME_SIZE: MAX_FRAME_SIZE,
}


def _address(name: tuple[str, int] | None) -> Address:
    return (str(name[0]), int(name[1])) if name else ("", 0)


class HboneError(ConnectionError):
    """An HBONE connection or request failed (`status` is set for a non-200 response)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TunnelConnection(asyncio.BufferedProtocol):
    server_side = False

    def __init__(self, context: ssl.SSLContext) -> None:
        self.loop = asyncio.get_running_loop()
        self.tls = TlsSession(context, self.server_side)
        self.parser = fr.FrameParser(MAX_FRAME_SIZE, expect_preface=self.server_side)
        self.transport: asyncio.Transport | None = None
        self.peer_address: Address = ("", 0)
        self.local_address: Address = ("", 0)
        self.peer_identities: list[str] = []
        self.streams: dict[int, TunnelStream] = {}
        self.ready: asyncio.Future[None] = self.loop.create_future()
        # Only a client awaits `ready`; mark a failure as seen so asyncio does not log it again.
        self.ready.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.max_send_chunk = MAX_FRAME_SIZE
        self.peer_max_frame = fr.DEFAULT_MAX_FRAME_SIZE
        self.peer_initial_window = fr.DEFAULT_WINDOW_SIZE
        self.peer_max_streams = 2**31 - 1
        self.goaway_received = False
        self._send_window = SendWindow(fr.DEFAULT_WINDOW_SIZE)
        self._receive_window = ReceiveWindow(CONNECTION_WINDOW, CONNECTION_WINDOW // 4)
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._header_block: tuple[int, int, bytearray] | None = None  # awaiting CONTINUATION
        self._write_paused = False
        self._read_view = memoryview(bytearray(READ_BUFFER_SIZE))
        # A TLS record may straddle reads: room for one more record than a full read.
        self._buffers = BufferRecycler(READ_BUFFER_SIZE + (64 << 10))
        self._writers: list[asyncio.WriteTransport] = []  # got views of the current buffer
        self._handshake_timer: asyncio.TimerHandle | None = None

    # -- subclass hooks -----------------------------------------------------------------
    def on_established(self) -> None:
        """TLS is up (peer identities known); raise HboneError to refuse the peer."""

    def on_headers(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        raise NotImplementedError

    # -- transport events ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports do not subclass asyncio.Transport, hence a cast and no isinstance
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.peer_address = _address(transport.get_extra_info("peername"))
        self.local_address = _address(transport.get_extra_info("sockname"))
        self._handshake_timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)
        try:
            self._advance_handshake()
        except Exception as exc:
            self.fail(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.tls.feed(self._read_view[:nbytes])
            if self.tls.established or self._advance_handshake():
                self._receive()
        except Exception as exc:  # a bad peer must only ever cost its own connection
            self.fail(exc)

    def eof_received(self) -> bool:
        if not self.tls.established:
            self.fail(HboneError("EOF during the TLS handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        error = HboneError(f"HBONE connection to {self.peer_address} closed: {exc or 'EOF'}")
        if not self.ready.done():
            self.ready.set_exception(error)
        for stream in list(self.streams.values()):
            stream.on_peer_reset()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_all_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_all_reading()

    # -- receiving ----------------------------------------------------------------------
    def fail(self, exc: Exception) -> None:
        log.warning(
            "hbone %s %s: closing connection: %s: %s",
            self._role(),
            self.peer_address,
            type(exc).__name__,
            exc,
        )
        if not self.ready.done():
            self.ready.set_exception(exc if isinstance(exc, HboneError) else HboneError(str(exc)))
        if isinstance(exc, fr.FrameError) and self.tls.established:
            self._write(fr.goaway(0, exc.code))
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def _role(self) -> str:
        return "server" if self.server_side else "client"

    def _handshake_expired(self) -> None:
        if not self.tls.established:
            self.fail(HboneError("TLS handshake timed out"))

    def _advance_handshake(self) -> bool:
        done = self.tls.handshake()
        self._flush()
        if not done:
            return False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.tls.alpn() != ALPN_H2:
            raise HboneError(f"peer did not negotiate ALPN h2 (got {self.tls.alpn()!r})")
        self.peer_identities = self.tls.peer_identities()
        self.on_established()
        if not self.server_side:
            self._write(fr.PREFACE)
        self._write(fr.settings_frame(self._our_settings()))
        self._write(fr.window_update(0, CONNECTION_WINDOW - fr.DEFAULT_WINDOW_SIZE))
        self.ready.set_result(None)
        return True

    def _our_settings(self) -> dict[int, int]:
        return OUR_SETTINGS if self.server_side else {fr.SETTINGS_ENABLE_PUSH: 0, **OUR_SETTINGS}

    def _receive(self) -> None:
        buffer = self._buffers.take(self.tls.plaintext_bound())
        plaintext = self.tls.decrypt_into(buffer)
        if plaintext:
            for event in self.parser.feed(plaintext):
                self._dispatch(event)
        self._buffers.lend(buffer, self._writers)
        self._writers = []
        self._flush()

    def _dispatch(self, event: fr.Event) -> None:
        if self._header_block is not None and not (
            isinstance(event, fr.ControlFrame) and event.ftype == fr.CONTINUATION
        ):
            raise fr.FrameError(fr.PROTOCOL_ERROR, "expected CONTINUATION")
        if isinstance(event, fr.DataChunk):
            self._on_data(event)
        else:
            self._on_control(event)

    def _on_data(self, chunk: fr.DataChunk) -> None:
        # The connection window is returned at once; a stream's only once its socket took
        # the bytes, so a slow socket stalls its own stream and not the connection.
        self._receive_window.receive(chunk.flow)
        self._credit_connection(chunk.flow)
        stream = self.streams.get(chunk.stream_id)
        if stream is None or stream.received_end:
            return  # a stream we reset or already answered: drop the bytes
        stream.receive_window.receive(chunk.flow)
        if chunk.data:
            writer = stream.deliver(chunk.data)
            if writer is not None:
                self._writers.append(writer)
        if chunk.flow > len(chunk.data):
            self.credit_stream(stream, chunk.flow - len(chunk.data))  # padding
        if chunk.end:
            stream.on_remote_end()

    def _on_control(self, frame: fr.ControlFrame) -> None:
        handler = self._control_handlers.get(frame.ftype)
        if handler is not None:
            handler(self, frame)

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
        self._header_block[2].extend(frame.payload)
        if frame.flags & fr.FLAG_END_HEADERS:
            self._finish_header_block()

    def _finish_header_block(self) -> None:
        assert self._header_block is not None
        stream_id, flags, block = self._header_block
        self._header_block = None
        try:
            headers = [(str(n), str(v)) for n, v in self._decoder.decode(bytes(block))]
        except hpack.HPACKError as exc:
            raise fr.FrameError(fr.COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        self.on_headers(stream_id, headers, bool(flags & fr.FLAG_END_STREAM))

    def _on_rst_stream(self, frame: fr.ControlFrame) -> None:
        fr.parse_u32(frame.payload, "RST_STREAM")
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            stream.on_peer_reset()

    def _on_settings(self, frame: fr.ControlFrame) -> None:
        if frame.flags & fr.FLAG_ACK:
            return
        for key, value in fr.parse_settings(frame.payload).items():
            self._apply_setting(key, value)
        self._write(fr.settings_ack())
        self._update_all_reading()

    def _apply_setting(self, key: int, value: int) -> None:
        if key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
            if value > fr.MAX_WINDOW_SIZE:
                raise fr.FrameError(fr.FLOW_CONTROL_ERROR, "initial window too large")
            delta, self.peer_initial_window = value - self.peer_initial_window, value
            for stream in self.streams.values():
                stream.send_window.available += delta
        elif key == fr.SETTINGS_MAX_FRAME_SIZE:
            if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_ALLOWED_FRAME_SIZE:
                raise fr.FrameError(fr.PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}")
            self.peer_max_frame = value
        elif key == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value

    def _on_ping(self, frame: fr.ControlFrame) -> None:
        if len(frame.payload) != 8:
            raise fr.FrameError(fr.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
        if not frame.flags & fr.FLAG_ACK:
            self._write(fr.ping_ack(frame.payload))

    def _on_goaway(self, frame: fr.ControlFrame) -> None:
        self.goaway_received = True

    def _on_window_update(self, frame: fr.ControlFrame) -> None:
        increment = fr.parse_window_increment(frame.payload)
        if frame.stream_id == 0:
            self._send_window.grow(increment)
            self._update_all_reading()
            return
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            stream.send_window.grow(increment)
            self._send_held(stream)
            stream.update_reading()

    def _on_push_promise(self, frame: fr.ControlFrame) -> None:
        raise fr.FrameError(fr.PROTOCOL_ERROR, "PUSH_PROMISE is not allowed")

    _control_handlers: ClassVar[dict[int, Callable[[TunnelConnection, fr.ControlFrame], None]]]
    _control_handlers = {
        fr.HEADERS: _on_headers_frame,
        fr.CONTINUATION: _on_continuation,
        fr.RST_STREAM: _on_rst_stream,
        fr.SETTINGS: _on_settings,
        fr.PING: _on_ping,
        fr.GOAWAY: _on_goaway,
        fr.WINDOW_UPDATE: _on_window_update,
        fr.PUSH_PROMISE: _on_push_promise,
    }

    # -- flow control -------------------------------------------------------------------
    def credit_stream(self, stream: TunnelStream, length: int) -> None:
        increment = stream.receive_window.consume(length)
        if increment and stream.id in self.streams:
            self._write(fr.window_update(stream.id, increment))
            self._flush()

    def _credit_connection(self, length: int) -> None:
        increment = self._receive_window.consume(length)
        if increment:
            self._write(fr.window_update(0, increment))

    def sendable(self, stream: TunnelStream) -> int:
        return min(
            stream.send_window.available,
            self._send_window.available,
            self.peer_max_frame,
            self.max_send_chunk,
        )

    def can_send(self, stream: TunnelStream) -> bool:
        return not self._write_paused and not stream.held and self.sendable(stream) > 0

    def _update_all_reading(self) -> None:
        for stream in list(self.streams.values()):
            self._send_held(stream)
            stream.update_reading()

    # -- sending ------------------------------------------------------------------------
    def send_data(self, stream: TunnelStream, buffer: bytearray, length: int) -> bool:
        """Send `buffer[9:9+length]` as one DATA frame, using its first 9 bytes for the header.

        Returns whether the stream may send more right now."""
        allowed = min(length, self.sendable(stream))
        if allowed < length:  # the window shrank under a pending read: keep the excess
            stream.held = bytes(buffer[fr.HEADER_SIZE + allowed : fr.HEADER_SIZE + length])
        if allowed > 0:
            self._spend(stream, allowed)
            fr.pack_header_into(buffer, allowed, fr.DATA, 0, stream.id)
            self.tls.encrypt(memoryview(buffer)[: fr.HEADER_SIZE + allowed])
            self._flush()
        return self.can_send(stream)

    def _send_held(self, stream: TunnelStream) -> None:
        while stream.held and self.sendable(stream) > 0:
            piece = stream.held[: self.sendable(stream)]
            stream.held = stream.held[len(piece) :]
            self._spend(stream, len(piece))
            self._write(fr.frame(fr.DATA, 0, stream.id, piece))
        self._flush()

    def _spend(self, stream: TunnelStream, length: int) -> None:
        stream.send_window.spend(length)
        self._send_window.spend(length)

    def send_headers(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        block = self._encoder.encode(headers)
        self._write(fr.headers_frames(stream_id, block, end, self.peer_max_frame))
        self._flush()

    def send_end_stream(self, stream: TunnelStream) -> None:
        stream.sent_end = True
        self._write(fr.frame(fr.DATA, fr.FLAG_END_STREAM, stream.id))
        self._flush()

    def send_reset(self, stream: TunnelStream) -> None:
        if stream.id in self.streams:
            self._write(fr.rst_stream(stream.id, fr.CONNECT_ERROR))
            self._flush()

    def forget(self, stream: TunnelStream) -> None:
        self.streams.pop(stream.id, None)

    def _write(self, plaintext: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.tls.encrypt(plaintext)

    def _flush(self) -> None:
        output = self.tls.take_output()
        if output and self.transport is not None and not self.transport.is_closing():
            self.transport.write(output)

    def close(self) -> None:
        """Tell the peer we are done (GOAWAY) and close; open streams are reset."""
        if self.transport is not None and not self.transport.is_closing():
            if self.tls.established:
                self._write(fr.goaway(0, fr.NO_ERROR))
                self._flush()
            self.transport.close()
