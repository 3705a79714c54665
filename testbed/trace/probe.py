"""The traced connection: one TCP connection from a pod, a few bytes each way, closed.

The client socket binds a source port of its own (below the ephemeral range, so no other
connection of the testbed uses it), which makes its 5-tuple the trace's key. Each trace
also sends a request of its own length, so proxies' records of two simultaneous traces
to one destination are told apart by their byte counts.

The request is a small HTTP/1.1 GET (so that a waypoint's L7 proxy forwards it like any
request) whose path carries the trace's token. Where nothing listens on the destination, a
throwaway listener answers in the endpoint pods' namespaces with the peer address it saw
(the app's view of the connection) in the body. An existing listener gets the same
request; any answer from it counts as a connection that worked.
"""

from __future__ import annotations

import contextlib
import errno
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from testbed.netlab import Netns

PORT_RANGE = (20000, 29999)  # below net.ipv4.ip_local_port_range's default 32768-60999
CONNECT_TIMEOUT = 3.0
REQUEST_MIN = 120
TRACE_PATH = "/testbed-trace/"


@dataclass
class Outcome:
    ok: bool
    error: str | None
    source: tuple[str, int]
    destination: tuple[str, int]
    token: str
    request_bytes: int
    bytes_received: int = 0
    seen_by_app: str | None = None  # "ip:port" the server's socket saw as its peer
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Listener:
    """Throwaway listeners in endpoint namespaces; each remembers the peer of each token."""

    sockets: list[socket.socket] = field(default_factory=list)
    peers: dict[str, str] = field(default_factory=dict)  # token -> peer the app saw
    answered_by: dict[str, str] = field(default_factory=dict)  # token -> netns name
    threads: list[threading.Thread] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def serve(self, sock: socket.socket, netns: str) -> None:
        sock.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn, peer, netns), daemon=True).start()

    def _answer(self, conn: socket.socket, peer: tuple[str, int], netns: str) -> None:
        with conn:
            conn.settimeout(CONNECT_TIMEOUT)
            try:
                head = _read_until(conn, b"\r\n\r\n")
                token = token_of(head)
                seen = f"{peer[0]}:{peer[1]}"
                self.peers[token] = seen
                self.answered_by[token] = netns
                body = f"SEEN {seen} {token}\n".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            except OSError:
                pass


def token_of(head: str) -> str:
    """The token in a trace request's path (GET /testbed-trace/<token> HTTP/1.1)."""
    words = head.split(" ", 2)
    if len(words) >= 2 and words[1].startswith(TRACE_PATH):
        return words[1][len(TRACE_PATH) :]
    return ""


def request_bytes(host: str, token: str, size: int) -> bytes:
    """A GET of exactly `size` bytes (padded in a header), carrying `token` in its path."""
    head = f"GET {TRACE_PATH}{token} HTTP/1.1\r\nHost: {host}\r\nX-Testbed-Trace: "
    tail = "\r\nConnection: close\r\n\r\n"
    return (head + "x" * max(1, size - len(head) - len(tail)) + tail).encode()


def _read_until(conn: socket.socket, end: bytes | None, limit: int = 65536) -> str:
    """Bytes until `end` (None: until the peer closes), at most `limit`."""
    data = b""
    while (end is None or end not in data) and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


@contextlib.contextmanager
def listening(endpoints: list[tuple[Netns, int]]) -> Iterator[Listener]:
    """A throwaway listener on 0.0.0.0:port in each namespace where the port is free."""
    listener = Listener()
    for netns, port in endpoints:
        try:
            with netns.entered():
                sock = socket.create_server(("0.0.0.0", port), backlog=64)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue  # something listens there already; it answers instead
        listener.sockets.append(sock)
        thread = threading.Thread(target=listener.serve, args=(sock, netns.name), daemon=True)
        thread.start()
        listener.threads.append(thread)
    try:
        yield listener
    finally:
        listener.stopped.set()
        for thread in listener.threads:
            thread.join(timeout=1.0)
        for sock in listener.sockets:
            sock.close()


def client_socket(netns: Netns, source_ip: str) -> socket.socket:
    """A TCP socket in `netns` bound to a random port of PORT_RANGE not in use there."""
    for _ in range(50):
        port = random.randint(*PORT_RANGE)
        with netns.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((source_ip, port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no free source port for the trace")


def request_size(source_port: int) -> int:
    return REQUEST_MIN + source_port % 200


def connect_once(sock: socket.socket, destination: tuple[str, int]) -> Outcome:
    """Connect, send the request line, read the answer, close; never raises for the
    connection's own failure (that is part of what a trace reports)."""
    source = sock.getsockname()
    token = secrets.token_hex(6)
    size = request_size(source[1])
    request = request_bytes(destination[0], token, size)
    outcome = Outcome(False, None, (source[0], source[1]), destination, token, len(request))
    outcome.started = time.time()
    with sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(destination)
            sock.sendall(request)
            answer = _read_until(sock, None)
            outcome.bytes_received = len(answer)
            words = answer.partition("\r\n\r\n")[2].split()
            if len(words) >= 2 and words[0] == "SEEN":
                outcome.seen_by_app = words[1]
            outcome.ok = bool(answer)
            if not answer:
                outcome.error = "the connection closed without an answer"
        except OSError as exc:
            outcome.error = _error_text(exc)
    outcome.ended = time.time()
    return outcome


def _error_text(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {CONNECT_TIMEOUT:g} s"
    return exc.strerror or str(exc)
