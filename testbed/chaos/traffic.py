"""Traffic that knows what happened to it: sha256-checked bulk transfers and fixed-rate HTTP.

A `Sha256Sink` in a server pod reads each connection to EOF and answers the sha256 of what
it read. A `BulkFlow` sends fresh random data to it, transfer after transfer, and compares
the answer with its own digest; an `HttpFlow` sends GETs at a fixed rate. Every operation
(a transfer, a request) ends as one `Op` with an outcome:

    ok        the bytes arrived intact (or the reply was 200)
    corrupt   the server's sha256 differs from the client's: never acceptable
    reset     the connection was refused, reset or cut (EOF before the answer): a clean end
    hang      no progress for HANG_SECONDS: never acceptable

The client sockets are made inside the client pod's namespace by the calling process (as
the integration tests do), so no tool's output needs parsing to tell these apart.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from testbed.netlab.tcpserver import NetnsTcpServer

if TYPE_CHECKING:
    from testbed.cluster.cluster import Pod

SINK_PORT = 9301
HANG_SECONDS = 10.0  # an operation without progress this long is a hang, not a clean failure
TRANSFER_BYTES = 4 << 20
CHUNK = 256 << 10
RETRY_PAUSE = 0.1  # between a failed operation and the next try

Outcome = Literal["ok", "corrupt", "reset", "hang"]


@dataclass(frozen=True)
class Op:
    flow: str
    started: float  # time.monotonic()
    ended: float
    outcome: Outcome
    detail: str = ""


def classify(exc: BaseException) -> Outcome:
    """A failed operation: a timeout is a hang, any other socket error a clean end."""
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return "hang"
    return "reset"


class Sha256Sink(NetnsTcpServer):
    """Listens in `pod` on `port`; answers each connection the sha256 of what it read."""

    def __init__(self, pod: Pod, port: int = SINK_PORT) -> None:
        super().__init__(pod.netns, port)

    def serve(self, conn: socket.socket, peer_ip: str) -> None:
        conn.settimeout(HANG_SECONDS * 3)  # a peer that vanished does not pin a thread
        digest = hashlib.sha256()
        while chunk := conn.recv(1 << 20):
            digest.update(chunk)
        conn.sendall(digest.hexdigest().encode())


def connect_from(pod: Pod, ip: str, port: int, timeout: float = HANG_SECONDS) -> socket.socket:
    with pod.netns.entered():
        return socket.create_connection((ip, port), timeout=timeout)


def transfer(pod: Pod, ip: str, port: int = SINK_PORT, size: int = TRANSFER_BYTES) -> Outcome:
    """One sha256-checked transfer of `size` fresh random bytes; OSError if cut."""
    sent = hashlib.sha256()
    with connect_from(pod, ip, port) as sock:
        left = size
        while left > 0:
            block = os.urandom(min(CHUNK, left))
            sock.sendall(block)
            sent.update(block)
            left -= len(block)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(128):
            answer += chunk
    if not answer:
        raise ConnectionResetError("EOF before the server's sha256")
    return "ok" if answer.decode(errors="replace") == sent.hexdigest() else "corrupt"


def http_get(pod: Pod, ip: str, port: int, path: str = "/") -> Outcome:
    """One GET on a new connection; OSError (or HTTPException) if it failed."""
    conn = http.client.HTTPConnection(ip, port, timeout=HANG_SECONDS)
    conn.sock = connect_from(pod, ip, port)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise ConnectionResetError(f"HTTP {response.status}")
    return "ok"


@dataclass
class Flow:
    """A thread running one kind of operation back to back (or at a rate) until stopped."""

    name: str
    client: Pod
    ip: str
    port: int
    interval: float = 0.0  # seconds between the starts of two operations (0: back to back)
    ops: list[Op] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def once(self) -> Outcome:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"flow-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(HANG_SECONDS * 2)

    def _loop(self) -> None:
        next_start = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            outcome, detail = self.attempt()
            self.ops.append(Op(self.name, started, time.monotonic(), outcome, detail))
            if outcome != "ok":
                self._stop.wait(RETRY_PAUSE)
            if self.interval:
                next_start += self.interval
                self._stop.wait(max(0.0, next_start - time.monotonic()))
                next_start = max(next_start, time.monotonic() - self.interval)

    def attempt(self) -> tuple[Outcome, str]:
        try:
            return self.once(), ""
        except (OSError, http.client.HTTPException) as exc:
            return classify(exc), f"{type(exc).__name__}: {exc}"


class BulkFlow(Flow):
    def once(self) -> Outcome:
        return transfer(self.client, self.ip, self.port)


class HttpFlow(Flow):
    def once(self) -> Outcome:
        return http_get(self.client, self.ip, self.port)


def first_success(flow: Flow, bound: float) -> float | None:
    """Seconds until one new operation of `flow`'s kind succeeds, tried again and again
    (a fresh connection each time) for at most `bound` s; None if none did."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        outcome, _ = flow.attempt()
        if outcome == "ok":
            return time.monotonic() - started
        time.sleep(RETRY_PAUSE)
    return None
