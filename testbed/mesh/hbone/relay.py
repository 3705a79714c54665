"""Plain TCP helpers for ztunnel: connecting upstreams and a fast TCP <-> TCP passthrough relay.

`relay_tcp(a, b)` moves bytes with `os.splice` through a pipe (the kernel copies page
references, Python never touches the bytes), one thread per direction with blocking sockets;
awaiting it from asyncio does not block the event loop. EOF is forwarded as shutdown(SHUT_WR);
a reset on one side resets the other (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable

from .connect import Address

SPLICE_CHUNK = 1 << 20
_LINGER_ZERO = struct.pack("ii", 1, 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# (level, option) pairs letting a socket bind a foreign address (Linux values).
_TRANSPARENT_OPTIONS = {
    socket.AF_INET: ((socket.SOL_IP, 19), (socket.SOL_IP, 15)),  # IP_TRANSPARENT, IP_FREEBIND
    socket.AF_INET6: ((socket.IPPROTO_IPV6, 75), (socket.IPPROTO_IPV6, 78)),  # IPV6_ variants
}


async def connect_tcp(
    dest: Address,
    *,
    source: Address | None = None,
    transparent: bool = False,
    socket_factory: Callable[[int], socket.socket] | None = None,
) -> socket.socket:
    """A connected non-blocking TCP socket to `dest`.

    `source` binds the local address first; with `transparent` the socket gets IP_TRANSPARENT
    (and IP_FREEBIND) so it may bind a foreign address, as ztunnel's inbound does to keep the
    client's source IP. Raises OSError when the connect fails.
    """
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    sock = socket_factory(family) if socket_factory else socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transparent:
            for level, option in _TRANSPARENT_OPTIONS[family]:
                sock.setsockopt(level, option, 1)
        if source is not None:
            sock.bind(source)
        await asyncio.get_running_loop().sock_connect(sock, dest)
    except BaseException:
        sock.close()
        raise
    return sock


def reset_socket(sock: socket.socket) -> None:
    """Close `sock` with a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


def _pump(source: socket.socket, dest: socket.socket) -> OSError | None:
    """Splice `source` -> `dest` until EOF (then half-close `dest`); returns the error, if any."""
    pipe_read, pipe_write = os.pipe()
    try:
        fcntl.fcntl(pipe_write, _F_SETPIPE_SZ, SPLICE_CHUNK)
        while True:
            moved = os.splice(source.fileno(), pipe_write, SPLICE_CHUNK, flags=os.SPLICE_F_MOVE)
            if not moved:
                dest.shutdown(socket.SHUT_WR)
                return None
            while moved:
                moved -= os.splice(pipe_read, dest.fileno(), moved, flags=os.SPLICE_F_MOVE)
    except OSError as exc:
        return exc
    finally:
        os.close(pipe_read)
        os.close(pipe_write)


def _unblock(sock: socket.socket) -> None:
    """Wake the thread reading `sock` without sending a FIN (the caller then resets it)."""
    with contextlib.suppress(OSError):  # already disconnected
        sock.shutdown(socket.SHUT_RD)


def relay_blocking(a: socket.socket, b: socket.socket) -> None:
    """Relay both ways until both directions ended; closes both sockets (RST after an error)."""
    for sock in (a, b):
        sock.setblocking(True)
    errors: list[OSError | None] = []

    def backward() -> None:
        errors.append(_pump(b, a))
        if errors[-1] is not None:
            _unblock(a)

    thread = threading.Thread(target=backward, name="tcp-relay", daemon=True)
    thread.start()
    errors.append(_pump(a, b))
    if errors[-1] is not None:
        _unblock(b)
    thread.join()
    failed = any(error is not None for error in errors)
    for sock in (a, b):
        if failed:
            reset_socket(sock)
        else:
            sock.close()


async def relay_tcp(a: socket.socket, b: socket.socket) -> None:
    """`relay_blocking` in its own thread (not the default executor, which has few workers)."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            relay_blocking(a, b)
        finally:
            loop.call_soon_threadsafe(finished.set_result, None)

    threading.Thread(target=run, name="tcp-relay", daemon=True).start()
    await finished
