"""Apps the integration tests run in pods: a server that greets every connection with
"<pod name> <peer ip>" (the address the app saw, to check that the mesh keeps the client's),
and the client side that connects from inside a pod and reads that greeting; the project's
HTTP echo server as a pod process, and an HTTP client that requests from inside a pod."""

from __future__ import annotations

import hashlib
import http.client
import socket
import sys
import time
from dataclasses import dataclass

from testbed.cluster import Pod
from testbed.netlab import ManagedProcess
from testbed.netlab.tcpserver import NetnsTcpServer

APP_PORT = 8080


class GreetingServer(NetnsTcpServer):
    """Listens in `pod`; greets each connection, then reads to EOF and answers the sha256
    of what it read."""

    def __init__(self, pod: Pod, port: int = APP_PORT, *, backlog: int = 128) -> None:
        self.pod = pod
        super().__init__(pod.netns, port, backlog=backlog)

    def serve(self, conn: socket.socket, peer_ip: str) -> None:
        conn.sendall(f"{self.pod.name} {peer_ip}\n".encode())
        self.answer(conn)

    def answer(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
        conn.sendall(digest.hexdigest().encode())

    def close(self) -> None:
        self.listener.close()


class EchoServer(GreetingServer):
    """Greets, then echoes."""

    def answer(self, conn: socket.socket) -> None:
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


def connect(pod: Pod, ip: str, port: int = APP_PORT, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside `pod`."""
    with pod.netns.entered():
        return socket.create_connection((ip, port), timeout=timeout)


def read_line(sock: socket.socket) -> str:
    """One line, without its newline ('' if the peer closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def greet(pod: Pod, ip: str, port: int = APP_PORT, timeout: float = 5.0) -> str:
    """'<server pod> <peer ip as the server saw it>'; OSError if the connection fails."""
    with connect(pod, ip, port, timeout) as sock:
        return read_line(sock)


def greeting(pod: Pod, ip: str, port: int = APP_PORT, timeout: float = 5.0) -> str | None:
    """The server's greeting, or None if the connection failed or was cut."""
    try:
        return greet(pod, ip, port, timeout) or None
    except OSError:
        return None


def finish(sock: socket.socket) -> str:
    """Half-close and read the server's sha256 answer."""
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := sock.recv(128):
        answer += chunk
    return answer.decode()


def start_http_echo(pod: Pod, port: int = APP_PORT, timeout: float = 10.0) -> ManagedProcess:
    """testbed.workloads.http_echo in `pod` (its replies carry `x-served-by: <pod>`), returned
    once it accepts connections."""
    argv = [sys.executable, "-m", "testbed.workloads.http_echo", "--name", pod.name]
    process = pod.spawn([*argv, "--port", str(port)], label="http-echo")
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(pod, "127.0.0.1", port, timeout=1.0).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass(frozen=True)
class HttpReply:
    status: int
    served_by: str  # the x-served-by header ("-" without one)
    body: bytes


def http_requests(
    pod: Pod, ip: str, port: int, path: str, count: int, timeout: float = 10.0
) -> list[HttpReply]:
    """`count` GETs of `path` made from inside `pod`, on one keep-alive connection (a new one
    whenever the server closes it)."""
    replies: list[HttpReply] = []
    conn: http.client.HTTPConnection | None = None
    try:
        for _ in range(count):
            if conn is None:
                conn = http.client.HTTPConnection(ip, port, timeout=timeout)
                conn.sock = connect(pod, ip, port, timeout)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            replies.append(HttpReply(response.status, response.getheader("x-served-by", "-"), body))
            if response.will_close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()
    return replies
