"""HTTP/1.1 over asyncio streams: the waypoint's downstream server and upstream client.

Server: requests on one connection are answered in order (keep-alive, as the client asks).
A malformed request (bad request line or header, a head over 16 KiB: 431, a body over the
limit: 413, an unknown transfer coding: 501) is answered with its status and the connection
closed. Parsing rules are in h1codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from testbed.mesh.waypoint.h1codec import (
    Framing,
    ParseError,
    RequestHead,
    chunk_size,
    encode_head,
    framing,
    keep_alive,
    parse_request_head,
    parse_response_head,
)
from testbed.mesh.waypoint.messages import (
    MAX_BODY_SIZE,
    MAX_HEADER_BYTES,
    REASONS,
    Handler,
    HttpRequest,
    HttpResponse,
    end_to_end,
)
from testbed.netlab.errors import TestbedError

log = logging.getLogger(__name__)
HEAD_END = b"\r\n\r\n"


async def open_streams(
    sock: socket.socket, initial: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams on a connected socket whose first bytes were already read as `initial`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
    reader.feed_data(initial)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next message head, or None if the peer closed cleanly before one."""
    try:
        return await reader.readuntil(HEAD_END)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise ParseError("connection closed inside a message head") from None
        return None
    except asyncio.LimitOverrunError:
        raise ParseError("message head too large", 431) from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while size := chunk_size((await reader.readuntil(b"\r\n"))[:-2]):
        if len(body) + size > MAX_BODY_SIZE:
            raise ParseError("body too large", 413)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ParseError("chunk data not followed by CRLF")
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields: not forwarded
    return bytes(body)


async def _read_body(reader: asyncio.StreamReader, kind: Framing, length: int) -> bytes:
    try:
        if kind == "length":
            if length > MAX_BODY_SIZE:
                raise ParseError("body too large", 413)
            return await reader.readexactly(length)
        if kind == "chunked":
            return await _read_chunked(reader)
        if kind == "close":
            return await _read_to_eof(reader)
        return b""
    except asyncio.IncompleteReadError:
        raise ParseError("connection closed inside a body") from None
    except asyncio.LimitOverrunError:
        raise ParseError("chunk line too long") from None


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while chunk := await reader.read(1 << 16):
        body += chunk
        if len(body) > MAX_BODY_SIZE:
            raise ParseError("body too large", 413)
    return bytes(body)


# -- server ------------------------------------------------------------------------------


def _to_request(head: RequestHead, body: bytes) -> HttpRequest:
    host = next((v for n, v in head.headers if n == "host"), "")
    return HttpRequest(
        head.method, head.target, host, end_to_end(head.headers), body, f"HTTP/{head.version}"
    )


def _expects_continue(head: RequestHead) -> bool:
    return any(n == "expect" and v.lower() == "100-continue" for n, v in head.headers)


def _encode_response(response: HttpResponse, close: bool) -> bytes:
    start = f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}"
    return encode_head(start, response.headers, len(response.body), close) + response.body


async def serve_http1(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
) -> None:
    """Serve requests until the client closes or breaks the protocol; closes `writer`."""
    try:
        while head := await _read_head(reader):
            request_head = parse_request_head(head)
            kind, length = framing(request_head.headers, is_request=True)
            if kind != "none" and _expects_continue(request_head):
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s for it
            request = _to_request(request_head, await _read_body(reader, kind, length))
            response = await handler(request)
            close = not request_head.keep_alive
            writer.write(_encode_response(response, close))
            await writer.drain()
            if close:
                break
    except ParseError as exc:
        log.info("http/1.1 client %s: %s", writer.get_extra_info("peername"), exc)
        status = exc.status
        text = f"malformed request: {REASONS.get(status, status)}\n"
        writer.write(_encode_response(HttpResponse.local(status, text), close=True))
    except ConnectionError as exc:
        log.debug("http/1.1 connection ended: %r", exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- client ------------------------------------------------------------------------------


class UpstreamClosed(TestbedError, ConnectionError):
    """The upstream connection closed before a response came (a pooled connection may have
    been closed by the server meanwhile: the request may be sent again on a fresh one)."""


class Http1Client:
    """One keep-alive HTTP/1.1 connection to an upstream; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._idle = True  # the last exchange finished and left the connection usable

    @property
    def reusable(self) -> bool:
        return self._idle and not self.writer.is_closing() and not self.reader.at_eof()

    async def exchange(self, request: HttpRequest) -> HttpResponse:
        self._idle = False
        start = f"{request.method} {request.target} HTTP/1.1"
        headers = [("host", request.authority), *request.headers]
        try:
            self.writer.write(encode_head(start, headers, len(request.body), False) + request.body)
            await self.writer.drain()
        except ConnectionError as exc:
            raise UpstreamClosed(f"upstream closed: {exc}") from exc
        try:
            response, reusable = await self._read_response(request.method)
        except ParseError as exc:
            raise ConnectionError(f"upstream response broken: {exc}") from exc
        self._idle = reusable
        return response

    async def _read_response(self, method: str) -> tuple[HttpResponse, bool]:
        while True:
            head = await _read_head(self.reader)
            if head is None:
                raise UpstreamClosed("upstream closed before responding")
            parsed = parse_response_head(head)
            if parsed.status >= 200:
                break  # 1xx (100 Continue and the like) are not relayed
        kind: Framing = "none"
        length = 0
        if method != "HEAD" and parsed.status not in (204, 304):
            kind, length = framing(parsed.headers, is_request=False)
        body = await _read_body(self.reader, kind, length)
        reusable = kind != "close" and keep_alive(parsed.version, parsed.headers)
        return HttpResponse(parsed.status, end_to_end(parsed.headers), body), reusable

    def close(self) -> None:
        self.writer.close()
