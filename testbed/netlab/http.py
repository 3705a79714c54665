"""One plain HTTP/1.1 GET from inside a network namespace: how the testbed reads the admin,
metrics and readiness endpoints its processes serve there."""

from __future__ import annotations

import socket

from testbed.netlab.netns import Netns


def http_get(
    netns: Netns, port: int, path: str, *, host: str = "127.0.0.1", timeout: float = 2.0
) -> tuple[int, bytes]:
    """GET http://host:port/path inside `netns`: (status, body); OSError if nothing answers
    or what answers is not HTTP."""
    with netns.entered():
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP response from {host}:{port} in {netns.name}")
    return int(status_line[1]), body
