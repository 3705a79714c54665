"""HTTP/2 (prior knowledge, inside the HBONE tunnel) with h2: the waypoint's downstream server.

Streams are answered independently, each by its own task. A broken connection preface or any
other connection-level protocol error ends the connection (h2 queues the GOAWAY, which is
flushed before closing); a malformed request on one stream resets only that stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from testbed.mesh.waypoint.messages import (
    MAX_BODY_SIZE,
    Handler,
    HttpRequest,
    HttpResponse,
    end_to_end,
)

log = logging.getLogger(__name__)
READ_SIZE = 64 << 10


class Http2Server:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        # Header bytes are decoded per stream (_headers): h2's own decoding lets a
        # UnicodeDecodeError out of receive_data, which dropped the whole connection.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.window_opened = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, initial: bytes) -> None:
        """Serve until the client goes away or breaks the protocol; closes the writer."""
        self.conn.initiate_connection()
        data = initial
        try:
            while data:
                self._receive(data)
                self._flush()
                data = await self.reader.read(READ_SIZE)
        except h2.exceptions.ProtocolError as exc:
            log.info("http/2 client %s: %s", self.writer.get_extra_info("peername"), exc)
            self._flush()  # the GOAWAY h2 queued
        except (ConnectionError, _Terminated):
            pass
        finally:
            for task in self.tasks:
                task.cancel()
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def _receive(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = _headers(event.headers or [])
                if headers is None:  # malformed (RFC 9113 8.2.1): a stream error only
                    self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    continue
                self.pending[event.stream_id] = (headers, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._start(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.pending.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self.window_opened.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise _Terminated()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        self.conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
        entry = self.pending.get(stream_id)
        if entry is None:
            return
        entry[1].extend(event.data or b"")
        if len(entry[1]) > MAX_BODY_SIZE:
            self.pending.pop(stream_id)
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    def _start(self, stream_id: int | None) -> None:
        entry = self.pending.pop(stream_id or 0, None)
        if stream_id is None or entry is None:
            return
        task = asyncio.get_running_loop().create_task(self._answer(stream_id, *entry))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(
        self, stream_id: int, headers: list[tuple[str, str]], body: bytearray
    ) -> None:
        pseudo = {n: v for n, v in headers if n.startswith(":")}
        request = HttpRequest(
            pseudo.get(":method", "GET"),
            pseudo.get(":path", "/"),
            pseudo.get(":authority", ""),
            end_to_end((n, v) for n, v in headers if not n.startswith(":")),
            bytes(body),
            "HTTP/2",
        )
        response = await self.handler(request)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            await self._send(stream_id, response)

    async def _send(self, stream_id: int, response: HttpResponse) -> None:
        headers = [
            (":status", str(response.status)),
            *response.headers,
            ("content-length", str(len(response.body))),
        ]
        self.conn.send_headers(stream_id, headers, end_stream=not response.body)
        self._flush()
        view = memoryview(response.body)
        while view:
            allowed = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if allowed <= 0:
                self.window_opened.clear()
                await self.window_opened.wait()
                continue
            chunk, view = view[:allowed], view[allowed:]
            self.conn.send_data(stream_id, bytes(chunk), end_stream=not view)
            self._flush()
        await self.writer.drain()


def _headers(raw: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]] | None:
    """Header fields as text, or None if one is not UTF-8."""
    try:
        return [(_text(name), _text(value)) for name, value in raw]
    except UnicodeDecodeError:
        return None


def _text(field: bytes | str) -> str:
    return field.decode() if isinstance(field, bytes) else field


class _Terminated(Exception):
    """The client sent GOAWAY."""
