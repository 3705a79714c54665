"""Sockets inside a pod's network namespace, created from its netns fd (inpod mode).

ztunnel gets each enrolled pod's netns as a file descriptor and opens its listeners
(15001/15006/15008) inside it. A socket stays in the namespace it was created in, so only
the creation has to happen there: a throwaway thread enters the namespace with setns(),
creates and binds the socket, and exits. setns() affects only the calling thread, which is
why this never runs on the caller's (event-loop) thread, and why a thread that simply ends
needs no way back to its original namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

from testbed.netlab.nsutil import setns_fd

INPOD_MARK = 0x539  # 1337, exempts ztunnel's own sockets from the pod's capture rules
SO_ORIGINAL_DST = 80  # netfilter's getsockopt at SOL_IP: the pre-NAT destination
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address

T = TypeVar("T")


def call_in_netns(netns_fd: int, func: Callable[[], T]) -> T:
    """Run `func` on a fresh thread inside the namespace of `netns_fd`; return its result."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            setns_fd(netns_fd)
            outcome.append(func())
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)

    worker = threading.Thread(target=body, name=f"netns-fd-{netns_fd}", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _configure(sock: socket.socket, *, mark: int | None, transparent: bool, freebind: bool) -> None:
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    if transparent:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    if freebind:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)


def socket_in_netns(
    netns_fd: int,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    *,
    mark: int | None = INPOD_MARK,
    transparent: bool = False,
    freebind: bool = False,
    bind: tuple[str, int] | None = None,
) -> socket.socket:
    """An unconnected socket living in the pod's namespace.

    For ztunnel's inbound leg use `transparent=True, freebind=True, bind=(client_ip, 0)`
    so the app sees the real client address; connect it from any thread.
    """

    def setup(sock: socket.socket) -> None:
        _configure(sock, mark=mark, transparent=transparent, freebind=freebind)
        if bind is not None:
            sock.bind(bind)

    return call_in_netns(netns_fd, lambda: _set_up(socket.socket(family, type), setup))


def listen_in_netns(
    netns_fd: int,
    port: int,
    *,
    host: str = "0.0.0.0",
    transparent: bool = False,
    mark: int | None = INPOD_MARK,
    backlog: int = 1024,
) -> socket.socket:
    """A listening TCP socket on host:port inside the pod's namespace."""

    def setup(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _configure(sock, mark=mark, transparent=transparent, freebind=False)
        sock.bind((host, port))
        sock.listen(backlog)

    tcp = socket.AF_INET, socket.SOCK_STREAM
    return call_in_netns(netns_fd, lambda: _set_up(socket.socket(*tcp), setup))


def _set_up(sock: socket.socket, setup: Callable[[socket.socket], None]) -> socket.socket:
    """`sock` once `setup` ran on it; closed, not leaked, when setup fails."""
    try:
        setup(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """(ip, port) from a struct sockaddr_in as the kernel returns it."""
    port, packed = _SOCKADDR_IN.unpack(raw[: _SOCKADDR_IN.size])
    return str(ipaddress.IPv4Address(packed)), port


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a REDIRECTed connection was addressed to (SO_ORIGINAL_DST)."""
    return parse_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size))
