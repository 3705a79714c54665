"""HTTP/2 (prior knowledge, cleartext inside HBONE) with h2: the L7 proxies' downstream
server, and their upstream client for requests that came in over HTTP/2 (Envoy keeps the
client's protocol upstream).

Server: streams are answered independently, each by its own task. A broken connection
preface or any other connection-level protocol error ends the connection (h2 queues the
GOAWAY, which is flushed before closing); a malformed request on one stream resets only
that stream.

Client: one connection carries many requests at once, one stream each; a reader task
completes them. A stream the server refuses (REFUSED_STREAM) fails with StreamRefused, which
the retry condition `refused-stream` covers; a broken connection fails every open stream.
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
from testbed.netlab.errors import TestbedError


class StreamRefused(TestbedError, ConnectionError):
    """The upstream refused the stream before processing it (safe to retry)."""


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
        await send_body(self.conn, self.writer, self.window_opened, stream_id, response.body)


async def send_body(
    conn: h2.connection.H2Connection,
    writer: asyncio.StreamWriter,
    window_opened: asyncio.Event,
    stream_id: int,
    body: bytes,
) -> None:
    """Queue headers already sent, then `body` in DATA frames as flow control allows."""
    writer.write(conn.data_to_send())
    view = memoryview(body)
    while view:
        allowed = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
        if allowed <= 0:
            window_opened.clear()
            await window_opened.wait()
            continue
        chunk, view = view[:allowed], view[allowed:]
        conn.send_data(stream_id, bytes(chunk), end_stream=not view)
        writer.write(conn.data_to_send())
    await writer.drain()


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


class _Stream:
    def __init__(self, future: asyncio.Future[HttpResponse]) -> None:
        self.future = future
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()


class Http2Client:
    """One HTTP/2 connection to an upstream; requests run concurrently, one stream each."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self.streams: dict[int, _Stream] = {}
        self.window_opened = asyncio.Event()
        self.closed = False
        self._reading = asyncio.ensure_future(self._read())

    @property
    def reusable(self) -> bool:
        return not self.closed and not self.writer.is_closing()

    async def exchange(self, request: HttpRequest) -> HttpResponse:
        if not self.reusable:
            raise ConnectionError("upstream HTTP/2 connection is closed")
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", request.method),
            (":scheme", "http"),
            (":authority", request.authority),
            (":path", request.target),
            *request.headers,
        ]
        if request.body:
            headers.append(("content-length", str(len(request.body))))
        stream = _Stream(asyncio.get_running_loop().create_future())
        self.streams[stream_id] = stream
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not request.body)
            await send_body(self.conn, self.writer, self.window_opened, stream_id, request.body)
            return await stream.future
        finally:
            self.streams.pop(stream_id, None)

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(READ_SIZE):
                for event in self.conn.receive_data(data):
                    self._on_event(event)
                self.writer.write(self.conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError) as exc:
            log.info("upstream http/2 connection broke: %s", exc)
        finally:
            self.closed = True
            for stream in self.streams.values():
                if not stream.future.done():
                    stream.future.set_exception(ConnectionError("upstream closed the connection"))

    def _on_event(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", None) or 0)
        if isinstance(event, h2.events.WindowUpdated):
            self.window_opened.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True
        elif stream is None:
            return
        elif isinstance(event, h2.events.ResponseReceived):
            headers = [(str(n), str(v)) for n, v in event.headers or []]
            stream.status = int(dict(headers).get(":status", "0"))
            stream.headers = end_to_end((n, v) for n, v in headers if not n.startswith(":"))
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            stream.body.extend(event.data or b"")
        elif isinstance(event, h2.events.StreamEnded) and not stream.future.done():
            response = HttpResponse(stream.status, stream.headers, bytes(stream.body))
            stream.future.set_result(response)
        elif isinstance(event, h2.events.StreamReset) and not stream.future.done():
            refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            kind = StreamRefused if refused else ConnectionError
            stream.future.set_exception(kind(f"upstream reset the stream ({event.error_code})"))

    def close(self) -> None:
        self._reading.cancel()
        self.writer.close()
