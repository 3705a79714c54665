"""Serving HTTP on a connected socket through an L7 pipeline, for waypoints and L7 sidecars:
find out what the client speaks (testbed.mesh.waypoint.sniff), then HTTP/1.1 or HTTP/2.

`peek_protocol` looks at the first bytes without taking them (MSG_PEEK), so a connection
that turns out to be plain TCP is relayed with all its bytes still in the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from testbed.mesh.waypoint.http1 import open_streams, serve_http1
from testbed.mesh.waypoint.http2 import Http2Server
from testbed.mesh.waypoint.messages import Handler
from testbed.mesh.waypoint.sniff import Protocol, sniff

SNIFF_TIMEOUT = 1.0  # a client that says nothing for this long is taken as plain TCP
SNIFF_READ = 4096
_MORE_WAIT = 0.005  # a partial method token: look again after this long


async def _first_readable(
    socks: list[socket.socket], timeout: float | None
) -> socket.socket | None:
    """The first of `socks` with something to read (None: none within `timeout` s; no
    timeout: wait as long as it takes)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[socket.socket] = loop.create_future()

    def wake(sock: socket.socket) -> None:
        if not ready.done():
            ready.set_result(sock)

    for sock in socks:
        loop.add_reader(sock.fileno(), wake, sock)
    try:
        return await asyncio.wait_for(ready, None if timeout is None else max(timeout, 0.0))
    except TimeoutError:
        return None
    finally:
        for sock in socks:
            loop.remove_reader(sock.fileno())


async def peek_protocol(
    sock: socket.socket,
    timeout: float = SNIFF_TIMEOUT,
    server: socket.socket | None = None,
    *,
    http: bool = False,
) -> Protocol | None:
    """What the client on `sock` speaks, its bytes left unread; None: it closed silently.
    Plain TCP when it says nothing for `timeout` s, or when `server` (the connection to
    the app, if open already) speaks first, as server-first protocols do. A port declared
    HTTP (`http`) is HTTP whatever comes and however late; only the version is read (the
    HTTP/2 preface, else HTTP/1.1, whose parser refuses garbage)."""
    loop = asyncio.get_running_loop()
    deadline = None if http else loop.time() + timeout
    watched = [sock] if server is None or http else [sock, server]
    while True:
        first = await _first_readable(watched, None if deadline is None else deadline - loop.time())
        if first is not sock:
            return "tcp"
        try:
            data = sock.recv(SNIFF_READ, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except ConnectionError:
            return None
        if not data:
            return None
        protocol = sniff(data)
        if protocol != "more":
            return "http/1.1" if http and protocol == "tcp" else protocol
        await asyncio.sleep(_MORE_WAIT)


async def serve_http(
    sock: socket.socket, protocol: Protocol, handler: Handler, initial: bytes = b""
) -> None:
    """Serve HTTP/1.1 or HTTP/2 (`protocol`) on `sock` until the client goes away; `initial`
    holds bytes already read from it."""
    if protocol == "h2":
        if not initial:
            initial = await asyncio.get_running_loop().sock_recv(sock, SNIFF_READ)
        reader, writer = await asyncio.open_connection(sock=sock)
        await Http2Server(reader, writer, handler).run(initial)
    elif protocol == "http/1.1":
        await serve_http1(*await open_streams(sock, initial), handler)
    else:
        with contextlib.suppress(OSError):
            sock.close()
