"""Fixed-rate HTTP load generator free of coordinated omission; prints one JSON object.

Open model: request i is due at t0 + i/qps whatever happened to earlier requests. Requests
are spread over N persistent connections (HTTP/1.1 keep-alive, or HTTP/2 prior knowledge with
several streams per connection); a free connection takes the next due request. When no
connection is free at a request's due time (the server or network stalled), the request waits
and its latency is counted from its due time, so a stall is charged to every request that
should have been sent during it. When a connection was free and only the client's own timer
woke up late, latency is counted from the actual send (the slop is the client's, not the
server's). A request is never sent before its due time.

Run: python -m testbed.workloads.http_load --url http://IP:PORT/path --qps 1000
         --connections 4 --duration 10 --payload 1024 [--http2] [--warmup 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import uvloop

from testbed.measure.rows import Summary
from testbed.netlab.errors import TestbedError
from testbed.workloads.http_echo import send_within_window

CONNECT_RETRY_S = 0.1


# ---------------------------------------------------------------- statistics (pure)


def summarize(latencies_us: Sequence[int]) -> dict[str, float]:
    """count, mean, min, max and nearest-rank p50/p90/p99/p99.9 (us); just the count if empty."""
    if not latencies_us:
        return {"count": 0}
    return Summary.from_samples(latencies_us).to_dict()


def histogram(latencies_us: Sequence[int]) -> list[list[int]]:
    """Counts per 1-2-5 bucket: [[upper bound in us (inclusive), count], ...], empty buckets out."""
    counts: Counter[int] = Counter()
    for value in latencies_us:
        counts[_bucket_bound(value)] += 1
    return [[bound, counts[bound]] for bound in sorted(counts)]


def _bucket_bound(value: int) -> int:
    bound = 1
    while True:
        for step in (1, 2, 5):
            if value <= bound * step:
                return bound * step
        bound *= 10


# ---------------------------------------------------------------- HTTP/1.1 framing (pure)


class ResponseError(TestbedError):
    """The server's bytes are not a well-formed HTTP/1.1 response."""


def build_request(method: str, path: str, authority: str, payload: bytes) -> bytes:
    """The request bytes, built once and written as is for every request."""
    head = f"{method} {path} HTTP/1.1\r\nhost: {authority}\r\nuser-agent: testbed-http-load\r\n"
    if payload:
        head += f"content-length: {len(payload)}\r\ncontent-type: application/octet-stream\r\n"
    return (head + "\r\n").encode("latin-1") + payload


class ResponseParser:
    """Incremental HTTP/1.1 response framing: each response's status and where it ends.

    Supports content-length and chunked bodies, which is what the testbed's servers and proxies
    send. Hand-written because it costs ~3 us a response where h11 costs ~50 us, and the load
    generator shares the CPUs with the proxies it measures.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.status = 0
        self.body_left = -1  # -1: reading the head; >= 0: bytes of fixed-length body left
        self.chunked = False
        self.close_after = False  # the server said `connection: close`

    def feed(self, data: bytes) -> list[int]:
        """Consume bytes; return the statuses of the responses they completed."""
        self.buffer += data
        completed: list[int] = []
        while self._step():
            if self.body_left == -1 and not self.chunked:
                completed.append(self.status)
        return completed

    def _step(self) -> bool:
        """Advance by one unit (head, body, chunk); False when more bytes are needed."""
        if self.body_left == -1 and not self.chunked:
            return self._read_head()
        if self.chunked:
            return self._read_chunk()
        taken = min(self.body_left, len(self.buffer))
        del self.buffer[:taken]
        self.body_left -= taken
        if self.body_left == 0:
            self.body_left = -1
            return True
        return False

    def _read_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                raise ResponseError("response head larger than 64 KiB")
            return False
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise ResponseError(f"bad status line {lines[0][:80]!r}")
        try:
            self.status = int(status_line[1])
        except ValueError:
            raise ResponseError(f"bad status {status_line[1][:20]!r}") from None
        length = self._parse_fields(lines[1:])
        if 100 <= self.status < 200:
            return True  # interim response: the final one follows
        if self.status in (204, 304) or length == 0:
            self.body_left = 0
        elif length > 0:
            self.body_left = length
        elif not self.chunked:
            raise ResponseError("response without content-length or chunked encoding")
        return True

    def _parse_fields(self, lines: list[bytes]) -> int:
        """Record framing fields; return content-length, or -1 if there is none."""
        length = -1
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ResponseError(f"bad header line {line[:80]!r}")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                if not value.isdigit():
                    raise ResponseError(f"bad content-length {value[:20]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = value.endswith(b"chunked")
            elif name == b"connection":
                self.close_after = b"close" in value
        return length

    def _read_chunk(self) -> bool:
        if self.body_left > 0:  # inside chunk data (plus its CRLF)
            taken = min(self.body_left, len(self.buffer))
            del self.buffer[:taken]
            self.body_left -= taken
            return self.body_left == 0
        line_end = self.buffer.find(b"\r\n")
        if line_end < 0:
            return False
        if self.body_left == -2:  # after the last chunk: trailer lines until an empty one
            del self.buffer[: line_end + 2]
            if line_end == 0:
                self.chunked, self.body_left = False, -1
            return True
        size_text = bytes(self.buffer[:line_end]).split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ResponseError(f"bad chunk size {size_text[:20]!r}") from None
        del self.buffer[: line_end + 2]
        self.body_left = size + 2 if size else -2
        return True


# ---------------------------------------------------------------- connections


class Connection(Protocol):
    """A live client connection that can carry requests."""

    broken: bool

    def send(self) -> asyncio.Future[int]: ...

    def abandon(self, waiter: asyncio.Future[int]) -> None:
        """Give up on a request that timed out."""

    def close(self) -> None: ...


class Http1Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request outstanding."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass

    def send(self) -> asyncio.Future[int]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(self.request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self.parser.feed(data)
        except ResponseError as exc:
            self._fail(exc)
            return
        for status in statuses:
            if self.waiter is None:
                self._fail(ResponseError("response without a request"))
                return
            if not self.waiter.done():  # done: cancelled by a timeout
                self.waiter.set_result(status)
            self.waiter = None
        if statuses and self.parser.close_after:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed by server"))

    def abandon(self, waiter: asyncio.Future[int]) -> None:
        # Its late response would be taken for the next request's: only a new connection helps.
        self.close()

    def _fail(self, exc: BaseException) -> None:
        self.broken = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.waiter = None
        self.close()

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()


class Http2Connection(asyncio.Protocol):
    """One HTTP/2 prior-knowledge connection carrying concurrent streams."""

    def __init__(self, method: str, path: str, authority: str, payload: bytes) -> None:
        # Header validation is most of h2's CPU time; the load generator's own headers are
        # well-formed by construction and a response needs only its :status.
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.headers = [
            (b":method", method.encode()),
            (b":path", path.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b"user-agent", b"testbed-http-load"),
        ]
        if payload:
            self.headers.append((b"content-length", str(len(payload)).encode()))
        self.payload = payload
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.statuses: dict[int, int] = {}
        self.pending: dict[int, memoryview] = {}
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.initiate_connection()
        self._flush()

    def send(self) -> asyncio.Future[int]:
        stream_id = self.conn.get_next_available_stream_id()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[stream_id] = waiter
        self.conn.send_headers(stream_id, self.headers, end_stream=not self.payload)
        if self.payload:
            rest = send_within_window(self.conn, stream_id, memoryview(self.payload))
            if rest:
                self.pending[stream_id] = rest
        self._flush()
        return waiter

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(exc)
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers or []).get(b":status", b"0")
            self.statuses[event.stream_id] = int(status)
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._finish(event.stream_id, self.statuses.pop(event.stream_id, 0))
        elif isinstance(event, h2.events.StreamReset):
            self._finish(event.stream_id, ConnectionResetError(f"stream reset {event.error_code}"))
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id, rest in list(self.pending.items()):
                self.pending[stream_id] = send_within_window(self.conn, stream_id, rest)
                if not self.pending[stream_id]:
                    del self.pending[stream_id]
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._fail_all(ConnectionResetError(f"GOAWAY {event.error_code}"))

    def _finish(self, stream_id: int, outcome: int | BaseException) -> None:
        self.pending.pop(stream_id, None)
        waiter = self.waiters.pop(stream_id, None)
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(exc or ConnectionResetError("connection closed by server"))

    def abandon(self, waiter: asyncio.Future[int]) -> None:
        """Reset just the timed-out stream; the connection's other streams carry on."""
        for stream_id, candidate in list(self.waiters.items()):
            if candidate is waiter:
                self._finish(stream_id, TimeoutError())
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                self._flush()

    def _fail_all(self, exc: BaseException) -> None:
        self.broken = True
        for stream_id in list(self.waiters):
            self._finish(stream_id, exc)
        self.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()


@dataclass
class Target:
    """Where and what to send."""

    host: str
    port: int
    path: str
    payload: bytes
    http2: bool

    @classmethod
    def from_url(cls, url: str, payload_size: int, http2: bool) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http://host[:port]/path URL, got {url!r}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, parts.port or 80, path, b"x" * payload_size, http2)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def new_connection(self) -> Http1Connection | Http2Connection:
        method = "POST" if self.payload else "GET"
        if self.http2:
            return Http2Connection(method, self.path, self.authority, self.payload)
        return Http1Connection(build_request(method, self.path, self.authority, self.payload))


class Channel:
    """Hands out a live connection to one target, reconnecting when the previous one broke."""

    def __init__(self, target: Target, connect_timeout: float) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self.connection: Http1Connection | Http2Connection | None = None
        self.lock = asyncio.Lock()

    async def get(self) -> Connection:
        if self.connection is not None and not self.connection.broken:
            return self.connection
        async with self.lock:
            if self.connection is None or self.connection.broken:
                self.connection = await self._connect()
        return self.connection

    async def _connect(self) -> Http1Connection | Http2Connection:
        loop = asyncio.get_running_loop()
        # A TimeoutError is an OSError: an unanswered SYN counts as a connect error.
        transport, connection = await asyncio.wait_for(
            loop.create_connection(self.target.new_connection, self.target.host, self.target.port),
            self.connect_timeout,
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


# ---------------------------------------------------------------- schedule and recording


@dataclass
class Schedule:
    """Request i is due at t0 + i/qps; the first warmup*qps are not recorded, and the run
    ends after (warmup + duration)*qps requests. Counting by index keeps the number of
    recorded requests exact (due-time comparisons would drift with float rounding)."""

    qps: float
    warmup: float
    duration: float
    t0: float = 0.0
    next_index: int = 0

    def __post_init__(self) -> None:
        self.first_recorded = _requests_in(self.warmup * self.qps)
        self.end = _requests_in((self.warmup + self.duration) * self.qps)

    def claim(self) -> tuple[float, bool] | None:
        """The next request's due time and whether it is recorded; None once the run is over."""
        index = self.next_index
        if index >= self.end:
            return None
        self.next_index += 1
        return self.t0 + index / self.qps, index >= self.first_recorded


def _requests_in(expected: float) -> int:
    # Rounding first keeps 0.3 s at 100 qps at 30 requests despite binary floating point.
    return math.ceil(round(expected, 6))


@dataclass
class Recorder:
    """Latencies (us, raw) and errors of the recorded requests."""

    latencies_us: array[int] = field(default_factory=lambda: array("q"))
    errors: Counter[str] = field(default_factory=Counter)
    last_completion: float = 0.0

    def response(self, status: int, start: float, now: float) -> None:
        self.latencies_us.append(int((now - start) * 1e6))
        self.last_completion = max(self.last_completion, now)
        if status >= 400 or status < 100:
            self.errors[f"status_{status}"] += 1

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


async def _wait_until(due: float) -> None:
    """Sleep until `due`, never returning early (the loop's timers are millisecond-coarse)."""
    while (now := time.perf_counter()) < due:
        await asyncio.sleep(math.ceil((due - now) * 1000.0) / 1000.0)


async def _worker(channel: Channel, schedule: Schedule, recorder: Recorder, timeout: float) -> None:
    while (claimed := schedule.claim()) is not None:
        due, counted = claimed
        if time.perf_counter() < due:
            await _wait_until(due)
            start = time.perf_counter()  # sent as soon as due: any lateness is our timer's
        else:
            start = due  # behind schedule: the wait is charged (coordinated omission)
        try:
            connection = await channel.get()
        except OSError:
            if counted:
                recorder.error("connect")
            await asyncio.sleep(CONNECT_RETRY_S)
            continue
        kind = await _exchange(connection, recorder if counted else None, start, timeout)
        if kind is not None and counted:
            recorder.error(kind)


async def _exchange(
    connection: Connection, recorder: Recorder | None, start: float, timeout: float
) -> str | None:
    """One request/response; records the response, returns the error kind on failure."""
    try:
        waiter = connection.send()
    except (OSError, h2.exceptions.H2Error):
        connection.close()
        return "connection"
    try:
        status = await asyncio.wait_for(waiter, timeout)
    except TimeoutError:  # before OSError, of which it is a subclass
        connection.abandon(waiter)
        return "timeout"
    except ResponseError:
        return "protocol"
    except (OSError, h2.exceptions.H2Error):
        connection.close()
        return "connection"
    if recorder is not None:
        recorder.response(status, start, time.perf_counter())
    return None


@dataclass
class LoadConfig:
    url: str
    qps: float
    connections: int
    duration: float
    payload: int
    http2: bool
    warmup: float
    timeout: float
    h2_streams: int
    raw: bool


async def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run the load and return the report (the JSON object the CLI prints)."""
    target = Target.from_url(config.url, config.payload, config.http2)
    channels = [Channel(target, config.timeout) for _ in range(config.connections)]
    await _connect_all(channels)
    schedule = Schedule(config.qps, config.warmup, config.duration)
    recorder = Recorder()
    per_connection = config.h2_streams if config.http2 else 1
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    schedule.t0 = time.perf_counter() + 0.01
    workers = [
        _worker(channel, schedule, recorder, config.timeout)
        for channel in channels
        for _ in range(per_connection)
    ]
    await asyncio.gather(*workers)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    for channel in channels:
        channel.close()
    measure_start = schedule.t0 + config.warmup
    window = max(config.duration, recorder.last_completion - measure_start)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return _report(config, recorder, window, cpu, schedule)


async def _connect_all(channels: list[Channel]) -> None:
    """Open the connections before the clock starts: connecting is not part of the latency.

    A failure is ignored here; the worker retries and records it against its request."""
    await asyncio.gather(*(c.get() for c in channels), return_exceptions=True)


def _report(
    config: LoadConfig, recorder: Recorder, window: float, cpu_s: float, schedule: Schedule
) -> dict[str, Any]:
    latencies = recorder.latencies_us
    error_count = sum(recorder.errors.values())
    failed = error_count - sum(v for k, v in recorder.errors.items() if k.startswith("status_"))
    report: dict[str, Any] = {
        "url": config.url,
        "protocol": "h2" if config.http2 else "http/1.1",
        "target_qps": config.qps,
        "connections": config.connections,
        "duration_s": config.duration,
        "warmup_s": config.warmup,
        "payload_bytes": config.payload,
        "requests": len(latencies) + failed,
        "responses": len(latencies),
        "achieved_qps": len(latencies) / window if window > 0 else 0.0,
        "window_s": window,
        "errors": dict(recorder.errors),
        "error_count": error_count,
        "latency_us": summarize(latencies),
        "histogram_us": histogram(latencies),
        "client_cpu_s": cpu_s,
        "scheduled_total": schedule.next_index,
    }
    if config.raw:
        report["raw_latencies_us"] = latencies.tolist()
    return report


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://host:port/path")
    parser.add_argument("--qps", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="recorded seconds")
    parser.add_argument("--payload", type=int, default=1024, help="request body bytes (POST)")
    parser.add_argument("--http2", action="store_true", help="HTTP/2 prior knowledge (h2c)")
    parser.add_argument("--warmup", type=float, default=0.0, help="unrecorded seconds first")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (s)")
    parser.add_argument("--h2-streams", type=int, default=8, help="streams per h2 connection")
    parser.add_argument("--raw", action="store_true", help="include raw latencies in the JSON")
    args = parser.parse_args(argv)
    if min(args.qps, args.duration, args.timeout) <= 0 or min(args.payload, args.warmup) < 0:
        parser.error("--qps, --duration, --timeout must be > 0; --payload, --warmup >= 0")
    if min(args.connections, args.h2_streams) < 1:
        parser.error("--connections and --h2-streams must be >= 1")
    return LoadConfig(**vars(args))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        report = uvloop.run(run_load(config))
    except ValueError as exc:
        print(f"http_load: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
