"""The asyncio driver of one HBONE connection: TLS around the sans-I/O `HboneProtocol`.

`TunnelConnection` is an asyncio protocol on the raw TCP socket, shared by the client and the
server subclasses. It reads ciphertext into a 1 MiB buffer, decrypts everything available into
a pooled buffer, hands the plaintext to the protocol object and acts on its events (streams
are bridged to sockets by stream.py); after each batch the protocol's output (WINDOW_UPDATEs
included) is encrypted and written in one go. All HTTP/2 rules live in protocol.py. Any
protocol error closes this connection only, with one log line.

The PING keepalive is one timer per connection (never per stream or frame): it fires when the
protocol's `keepalive(now)` said, and again after each ACK. A peer that stops answering is
aborted (no waiting for its full buffers to drain): its streams are reset towards the local
sockets with a TCP RST, and `close_reason` says why.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from testbed.netlab.errors import TestbedError

from . import events as ev
from . import frames as fr
from .connect import Address
from .memory import BufferPool, Drain
from .protocol import HboneProtocol, PeerUnresponsive, Settings
from .stream import TunnelStream
from .tls import ALPN_H2, TlsSession

READ_BUFFER_SIZE = 1 << 20
WRITE_BUFFER_HIGH = 8 << 20
HANDSHAKE_TIMEOUT = 10.0

log = logging.getLogger("testbed.mesh.hbone")


def _address(name: tuple[str, int] | None) -> Address:
    return (str(name[0]), int(name[1])) if name else ("", 0)


class HboneError(TestbedError, ConnectionError):
    """An HBONE connection or request failed (`status` is set for a non-200 response)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TunnelConnection(asyncio.BufferedProtocol):
    server_side = False

    def __init__(self, context: ssl.SSLContext, settings: Settings) -> None:
        self.loop = asyncio.get_running_loop()
        self.tls = TlsSession(context, self.server_side)
        self.proto = HboneProtocol(client_side=not self.server_side, settings=settings)
        self.transport: asyncio.Transport | None = None
        self.peer_address: Address = ("", 0)
        self.local_address: Address = ("", 0)
        self.peer_identities: list[str] = []
        self.streams: dict[int, TunnelStream] = {}
        self.ready: asyncio.Future[None] = self.loop.create_future()
        # Only a client awaits `ready`; mark a failure as seen so asyncio does not log it again.
        self.ready.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.max_send_chunk = self.proto.settings.max_frame_size
        self.stream_buffer_limit = self.proto.settings.stream_buffer_limit
        self._write_paused = False
        self._read_view = memoryview(bytearray(READ_BUFFER_SIZE))
        # A TLS record may straddle reads: room for one more record than a full read.
        self._buffers = BufferPool(READ_BUFFER_SIZE + (64 << 10))
        self._marks: list[tuple[Drain, int]] = []  # writers given views of the current buffer
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.close_reason: str | None = None  # why we failed the connection, if we did

    @property
    def goaway_received(self) -> bool:
        return self.proto.goaway_received

    # -- subclass hooks -----------------------------------------------------------------
    def on_established(self) -> None:
        """TLS is up (peer identities known); raise HboneError to refuse the peer."""

    def on_request(self, event: ev.RequestReceived) -> None:
        """Server: a CONNECT request arrived."""

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
        for timer in (self._handshake_timer, self._keepalive_timer):
            if timer is not None:
                timer.cancel()
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
        self.close_reason = self.close_reason or f"{type(exc).__name__}: {exc}"
        if not self.ready.done():
            self.ready.set_exception(exc if isinstance(exc, HboneError) else HboneError(str(exc)))
        if isinstance(exc, fr.FrameError | PeerUnresponsive) and self.tls.established:
            self.flush()  # the GOAWAY the protocol queued
        self._write_tls_output()  # a failed handshake leaves its TLS alert there
        if self.transport is not None:
            if isinstance(exc, PeerUnresponsive):
                self.transport.abort()  # its buffers may never drain: do not wait for them
            else:
                self.transport.close()

    def _role(self) -> str:
        return "server" if self.server_side else "client"

    def _handshake_expired(self) -> None:
        if not self.tls.established:
            self.fail(HboneError("TLS handshake timed out"))

    def _advance_handshake(self) -> bool:
        done = self.tls.handshake()
        self._write_tls_output()
        if not done:
            return False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self.tls.alpn() != ALPN_H2:
            raise HboneError(f"peer did not negotiate ALPN h2 (got {self.tls.alpn()!r})")
        self.peer_identities = self.tls.peer_identities()
        self.on_established()
        self.proto.initiate_connection()
        self.flush()
        self.ready.set_result(None)
        self._keepalive()
        return True

    def _keepalive(self) -> None:
        """The keepalive timer fired, or a PING was answered: let the protocol decide."""
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        try:
            due = self.proto.keepalive(self.loop.time())
        except PeerUnresponsive as exc:
            self.fail(exc)
            return
        self.flush()
        if due is not None:
            self._keepalive_timer = self.loop.call_at(due, self._keepalive)

    def _receive(self) -> None:
        buffer = self._buffers.take(self.tls.plaintext_bound())
        plaintext = self.tls.decrypt_into(buffer)
        if plaintext:
            for event in self.proto.receive_data(plaintext):
                self._dispatch(event)
        self._buffers.lend(buffer, self._marks)
        self._marks = []
        self.flush()

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                mark = stream.deliver(event.data)
                if mark is not None:
                    self._marks.append(mark)
            else:  # the socket side is gone: nobody will read it
                self.proto.consumed(event.stream_id, len(event.data))
        elif isinstance(event, ev.WindowOpened):
            if event.stream_id == 0:
                self._update_all_reading()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                self._send_held(stream)
                stream.update_reading()
        elif isinstance(event, ev.StreamEnded):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.on_remote_end()
        elif isinstance(event, ev.StreamReset):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.on_peer_reset()
        elif isinstance(event, ev.ResponseReceived):
            if (stream := self.streams.get(event.stream_id)) is not None:
                stream.on_response(event.headers)
        elif isinstance(event, ev.RequestReceived):
            self.on_request(event)
        elif isinstance(event, ev.PingAcknowledged):
            self._keepalive()

    # -- flow control -------------------------------------------------------------------
    def sendable(self, stream: TunnelStream) -> int:
        return self.proto.sendable(stream.id)

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
        sent = self.proto.send_data_from_headroom(stream.id, buffer, length)
        if sent < length:  # the window shrank under a pending read: keep the excess
            stream.held = bytes(buffer[fr.HEADER_SIZE + sent : fr.HEADER_SIZE + length])
        if sent:
            self.flush()  # encrypts the view now, so `buffer` may be read into again
        return self.can_send(stream)

    def _send_held(self, stream: TunnelStream) -> None:
        if stream.held:
            sent = self.proto.send_data(stream.id, stream.held)
            stream.held = stream.held[sent:]
            self.flush()

    def send_headers(self, stream_id: int, headers: list[tuple[str, str]], end: bool) -> None:
        self.proto.send_headers(stream_id, headers, end)
        self.flush()

    def send_end_stream(self, stream: TunnelStream) -> None:
        stream.sent_end = True
        self.proto.end_stream(stream.id)
        self.flush()

    def send_reset(self, stream: TunnelStream) -> None:
        self.proto.reset_stream(stream.id)
        self.flush()

    def consumed(self, stream: TunnelStream, length: int) -> None:
        self.proto.consumed(stream.id, length)

    def forget(self, stream: TunnelStream) -> None:
        self.streams.pop(stream.id, None)
        self.proto.forget_stream(stream.id)

    def flush(self) -> None:
        """Encrypt what the protocol queued and write it (one transport write)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for chunk in self.proto.chunks_to_send():
            self.tls.encrypt(chunk)
        self._write_tls_output()

    def _write_tls_output(self) -> None:
        output = self.tls.take_output()
        if output and self.transport is not None and not self.transport.is_closing():
            self.transport.write(output)

    def close(self) -> None:
        """Tell the peer we are done (GOAWAY) and close; open streams are reset."""
        if self.transport is not None and not self.transport.is_closing():
            if self.tls.established:
                self.proto.close()
                self.flush()
            self.transport.close()
