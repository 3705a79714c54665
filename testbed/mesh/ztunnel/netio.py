"""Socket facts ztunnel needs: where a captured connection was going, and how many bytes
a finished connection carried (read from the kernel, so the fast relays need not count)."""

from __future__ import annotations

import socket
import struct
from types import TracebackType

from testbed.mesh.podsockets import original_dst

Address = tuple[str, int]

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, both __u64.
_TCP_INFO_BYTES = struct.Struct("=QQ")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_SIZE = _BYTES_ACKED_OFFSET + _TCP_INFO_BYTES.size


def destination_of(sock: socket.socket, listen_port: int) -> Address:
    """The address a captured connection was addressed to.

    TPROXY keeps it as the socket's local address; REDIRECT rewrites the local address to the
    listener's port, and the original is in conntrack (SO_ORIGINAL_DST).
    """
    ip, port = sock.getsockname()[:2]
    if port != listen_port:
        return str(ip), int(port)
    return original_dst(sock)


def parse_tcp_info_bytes(raw: bytes) -> tuple[int, int]:
    """(bytes sent and acknowledged, bytes received) from a raw struct tcp_info."""
    if len(raw) < _TCP_INFO_SIZE:
        return 0, 0  # a kernel older than 4.1 has no byte counters
    acked, received = _TCP_INFO_BYTES.unpack_from(raw, _BYTES_ACKED_OFFSET)
    return int(acked), int(received)


class ByteMeter:
    """Keeps a duplicate of a socket's fd so its byte counters stay readable after the
    relay closed the socket; the connection really closes when the meter does."""

    def __init__(self, sock: socket.socket) -> None:
        self._dup = sock.dup()

    def counts(self) -> tuple[int, int]:
        """(bytes sent to the peer, bytes received from it)."""
        try:
            raw = self._dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            return 0, 0
        return parse_tcp_info_bytes(raw)

    def close(self) -> None:
        self._dup.close()

    def __enter__(self) -> ByteMeter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
