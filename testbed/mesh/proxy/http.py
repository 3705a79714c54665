"""The proxies' small HTTP/1.1 endpoints (admin 15000, metrics 15020, readiness 15021).

Each answers GET requests for a few paths and closes the connection after the response;
that is all Prometheus scrapes, curl and readiness probes need. A route gets the request's
query parameters (`/connections?since=12` -> {"since": "12"}).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT = 5.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    def encode(self) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


Query = Mapping[str, str]
Route = Callable[[Query], Response]
Routes = dict[str, Route]


def respond(head: bytes, routes: Routes) -> Response:
    """The response to a raw request head (request line and headers), socket-free."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return Response(400, b"bad request line\n")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return Response(405, b"only GET\n")
    path, _, query = target.partition("?")
    route = routes.get(path)
    if route is None:
        return Response(404, f"no {path}; try {', '.join(sorted(routes))}\n".encode())
    response = route(dict(parse_qsl(query)))
    return Response(response.status, b"", response.content_type) if method == "HEAD" else response


async def _serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, routes: Routes
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        writer.write(respond(head, routes).encode())
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        pass  # a client that sends no complete request gets no answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve_http(host: str, port: int, routes: Routes) -> asyncio.Server:
    return await asyncio.start_server(
        lambda r, w: _serve_one(r, w, routes), host, port, limit=MAX_REQUEST_HEAD
    )
