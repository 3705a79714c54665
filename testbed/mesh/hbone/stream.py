"""One HBONE stream bridged to a plain TCP socket (the app connection or the captured client).

Tunnel -> socket: DATA chunks are written to the socket's transport as they arrive; the stream
window is credited back once the transport is not backed up, so a slow socket stalls only its
own stream. Socket -> tunnel: `SocketSide` reads straight into a buffer with 9 bytes of
headroom, sized to what the send windows allow, and each read becomes one DATA frame.
Half-close and reset map as in ztunnel: END_STREAM <-> shutdown(SHUT_WR), RST_STREAM <-> TCP
reset (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING, cast

from testbed.netlab.errors import TestbedError

from .connect import StreamStats
from .frames import HEADER_SIZE

if TYPE_CHECKING:
    from .connection import TunnelConnection

_LINGER_ZERO = struct.pack("ii", 1, 0)
FIRST_READ_SIZE = 64 << 10  # grown towards the frame size while reads keep filling it


class StreamReset(TestbedError, ConnectionError):
    """The peer reset the stream, or the tunnel connection failed."""


class TunnelStream:
    def __init__(self, conn: TunnelConnection, stream_id: int) -> None:
        self.id = stream_id
        self.conn = conn
        self.response: asyncio.Future[list[tuple[str, str]]] = conn.loop.create_future()
        # Only a client awaits the response; mark a failure as seen so nothing logs it.
        self.response.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.done: asyncio.Future[StreamStats] = conn.loop.create_future()
        self.sent_end = False
        self.received_end = False
        self.side: SocketSide | None = None
        self.held = b""  # read from the socket but beyond the send window (rare)
        self._early: list[bytes] = []  # data that arrived before a socket was attached
        self._written = 0  # bytes written to the socket's transport
        self._reported = 0  # of those, reported to the protocol as consumed
        self.to_socket = 0
        self.from_socket = 0
        self.was_reset = False

    def stats(self) -> StreamStats:
        error = self.conn.close_reason if self.was_reset else None
        return StreamStats(self.to_socket, self.from_socket, self.was_reset, error)

    # -- tunnel -> socket ---------------------------------------------------------------
    def sent_total(self) -> int:
        """Bytes written to the socket that left its transport's buffer (memory.Drain)."""
        side = self.side
        if side is None or side.transport is None:
            return self._written
        return self._written - side.transport.get_write_buffer_size()

    def deliver(self, data: memoryview) -> tuple[TunnelStream, int] | None:
        """Write `data` to the socket; returns (self, mark) if the transport kept a view:
        the buffer behind `data` is free once `sent_total()` reaches the mark."""
        self.to_socket += len(data)
        side = self.side
        if side is None or side.transport is None:
            self._early.append(bytes(data))
            return None
        transport = side.transport
        if transport.is_closing():
            # uvloop closes a transport at once on a write error (and raises on any later
            # write); connection_lost, which resets the stream, follows: drop the bytes.
            self.conn.consumed(self, len(data))
            return None
        # Behind a backlog the bytes would sit in the transport for a while: copy them, so a
        # slow socket never pins the pooled buffer (and its other streams' bytes) for long.
        backlog = transport.get_write_buffer_size()
        transport.write(bytes(data) if backlog else data)
        self._written += len(data)
        self.report_consumed()
        return (self, self._written) if not backlog else None

    def report_consumed(self) -> None:
        """Tell the protocol what left the transport since last time: that returns credit."""
        sent = self.sent_total()
        if sent > self._reported:
            self.conn.consumed(self, sent - self._reported)
            self._reported = sent

    def on_remote_end(self) -> None:
        self.received_end = True
        side = self.side
        if side is not None and side.transport is not None:
            side.shutdown_write()
        self._finish_if_closed()

    def on_response(self, headers: list[tuple[str, str]]) -> None:
        if not self.response.done():
            self.response.set_result(headers)

    def on_socket_drained(self) -> None:
        self.report_consumed()
        self.conn.flush()  # the WINDOW_UPDATE

    # -- socket -> tunnel ---------------------------------------------------------------
    def on_socket_eof(self) -> None:
        if not self.sent_end:
            self.conn.send_end_stream(self)
        self._finish_if_closed()

    def on_socket_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is not None or not (self.sent_end and self.received_end):
            self.conn.send_reset(self)  # a TCP reset (or an abrupt close) becomes RST_STREAM
            self.was_reset = True
        self._finish()

    # -- lifecycle ----------------------------------------------------------------------
    def attach(self, sock: socket.socket) -> asyncio.Future[StreamStats]:
        """Relay between this stream and the connected `sock`; `done` completes at the end."""
        if self.done.done():  # the peer reset the stream, or the tunnel died, before this
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            sock.close()
            return self.done
        sock.setblocking(False)
        if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small writes: no Nagle
        side = self.side = SocketSide(self)
        task = self.conn.loop.create_task(
            self.conn.loop.connect_accepted_socket(lambda: side, sock)
        )
        task.add_done_callback(self._attach_done)
        return self.done

    def _attach_done(self, task: asyncio.Task[object]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.reset()

    def on_socket_ready(self) -> None:
        side = self.side
        assert side is not None and side.transport is not None
        if self.done.done():  # reset while the socket was being attached
            side.abort_with_rst()
            return
        for chunk in self._early:
            side.transport.write(chunk)
            self._written += len(chunk)
        self._early.clear()
        self.on_socket_drained()
        if self.received_end:
            side.shutdown_write()
        self.update_reading()

    def reset(self) -> None:
        """Abort: reset the stream towards the peer and the socket with a TCP RST."""
        if not self.done.done():
            self.conn.send_reset(self)
            self.on_peer_reset()

    def on_peer_reset(self) -> None:
        self.was_reset = True
        if self.side is not None:
            self.side.abort_with_rst()
        if not self.response.done():
            self.response.set_exception(StreamReset(f"stream {self.id} reset"))
        self._finish()

    def update_reading(self) -> None:
        if self.side is not None:
            self.side.set_reading(
                not self.sent_end and self.conn.can_send(self) and not self.done.done()
            )

    def _finish_if_closed(self) -> None:
        if self.sent_end and self.received_end:
            if self.side is not None and self.side.transport is not None:
                self.side.transport.close()
            self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.stats())
        if not self.response.done():
            self.response.set_exception(StreamReset(f"stream {self.id} closed"))
        self.conn.forget(self)


class SocketSide(asyncio.BufferedProtocol):
    """The asyncio protocol on the plain TCP socket of a stream."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self._reading = True
        self._max_read = stream.conn.max_send_chunk
        self._allocate(min(FIRST_READ_SIZE, self._max_read))

    def _allocate(self, size: int) -> None:
        # Small at first: a stream costs 64 KiB, not 1 MiB, unless it carries bulk data.
        self._buffer = bytearray(HEADER_SIZE + size)
        self._view = memoryview(self._buffer)
        self._payload = self._view[HEADER_SIZE:]  # after room for the DATA frame header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        # Past the stream's buffer limit the protocol holds credit back until this drains.
        transport.set_write_buffer_limits(high=self.stream.conn.stream_buffer_limit)
        self.stream.on_socket_ready()

    def get_buffer(self, sizehint: int) -> memoryview:
        # Read no more than the windows let us send at once: every read is one DATA frame.
        limit = self.stream.conn.sendable(self.stream)
        if limit >= len(self._payload):
            return self._payload
        return self._view[HEADER_SIZE : HEADER_SIZE + max(1, limit)]

    def buffer_updated(self, nbytes: int) -> None:
        self.stream.from_socket += nbytes
        may_send = self.stream.conn.send_data(self.stream, self._buffer, nbytes)
        if nbytes == len(self._payload) and nbytes < self._max_read:
            self._allocate(min(4 * nbytes, self._max_read))  # the encrypted copy is in the BIO
        if not may_send:
            self.set_reading(False)  # resumed by a WINDOW_UPDATE or the TLS side draining

    def eof_received(self) -> bool:
        self.stream.on_socket_eof()
        return True  # keep the write side open: this is a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.on_socket_lost(exc)

    def pause_writing(self) -> None:
        self.backed_up = True

    def resume_writing(self) -> None:
        self.stream.on_socket_drained()

    def set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None or reading == self._reading or transport.is_closing():
            return
        self._reading = reading
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def shutdown_write(self) -> None:
        assert self.transport is not None
        if self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()

    def abort_with_rst(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()
