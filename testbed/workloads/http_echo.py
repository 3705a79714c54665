"""HTTP echo server run inside pods: HTTP/1.1 (h11) and HTTP/2 prior knowledge (h2) on one port.

Every response names the pod that served it (`x-served-by`) and echoes the request headers as
`x-echo-<name>`. Per-request controls, as query parameters or headers, let tests and experiments
shape the response:

    ?size=N       / x-size: N        body of N bytes (default: echo the request body)
    ?delay_ms=N   / x-delay-ms: N    answer after N milliseconds
    ?status=N     / x-status: N      answer with status N
    ?format=json  / accept: application/json   JSON body describing the request

`GET /healthz` answers 200. Malformed HTTP gets 400 (431 for oversized headers) and a close.

`--fail-every N` makes the app a flaky backend: every Nth request it answers (counting from 1)
gets 503 instead, as a backend that fails a share of its requests; `GET /stats` answers the
app's own counters as JSON (`{"requests": ..., "injected_503": ...}`), so a test can tell that
503s happened even when a proxy's retries hid them. Neither /healthz nor /stats is counted.

Run: python -m testbed.workloads.http_echo --port 8080 [--name POD] [--fail-every N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import http
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast
from urllib.parse import parse_qsl

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import uvloop

from testbed.netlab.errors import TestbedError

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEADER_BYTES = 16 * 1024
# Bounds both the response size a client may ask for and the request body kept for echoing.
MAX_BODY_SIZE = 64 * 1024 * 1024
MAX_DELAY_MS = 60_000
# Request headers that describe framing, not content: echoing them would only confuse clients.
_NOT_ECHOED = frozenset({b"content-length", b"transfer-encoding", b"connection"})

Headers = list[tuple[bytes, bytes]]
SERVER = b"testbed-http-echo"


def server_headers() -> Headers:
    """`date` and `server`, which standard servers send (RFC 9110 6.6.1, 10.2.4)."""
    return [(b"date", email.utils.formatdate(usegmt=True).encode()), (b"server", SERVER)]


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase (HTTP/1.1 clients such as h2load reject an empty one)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class BadControl(TestbedError, ValueError):
    """A per-request control (size, delay, status) is malformed or out of range."""


@dataclass(frozen=True)
class Request:
    """A fully received request, independent of the HTTP version it came in."""

    method: bytes
    target: bytes
    headers: Headers
    body: bytes
    protocol: str
    peer: str = ""  # the TCP peer "ip:port" the app saw (in the JSON description)


@dataclass(frozen=True)
class Reply:
    """What to answer and when."""

    status: int
    headers: Headers
    body: bytes
    delay_s: float


def _int_control(raw: str, name: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadControl(f"{name} is not an integer: {raw!r}") from None
    if not low <= value <= high:
        raise BadControl(f"{name} out of range [{low}, {high}]: {value}")
    return value


def _controls(request: Request) -> dict[str, str]:
    """Controls from headers, overridden by the query string (the more explicit of the two)."""
    by_header = {b"x-size": "size", b"x-delay-ms": "delay_ms", b"x-status": "status"}
    found: dict[str, str] = {}
    for name, value in request.headers:
        key = by_header.get(name.lower())
        if key is not None:
            found[key] = value.decode("latin-1")
        elif name.lower() == b"accept" and b"application/json" in value:
            found["format"] = "json"
    _, _, query = request.target.partition(b"?")
    found.update(parse_qsl(query.decode("latin-1")))
    return found


def _describe(request: Request, served_by: str) -> bytes:
    path, _, query = request.target.partition(b"?")
    description = {
        "served_by": served_by,
        "protocol": request.protocol,
        "method": request.method.decode("latin-1"),
        "path": path.decode("latin-1"),
        "query": query.decode("latin-1"),
        "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers},
        "body_bytes": len(request.body),
        "peer": request.peer,
    }
    return json.dumps(description).encode() + b"\n"


def build_reply(request: Request, served_by: str) -> Reply:
    """Decide the response to a request. Pure: no sockets, no clock."""
    base: Headers = [(b"x-served-by", served_by.encode())]
    if request.target.partition(b"?")[0] == b"/healthz":
        return Reply(200, [*base, (b"content-type", b"text/plain")], b"ok\n", 0.0)
    try:
        controls = _controls(request)
        status = _int_control(controls.get("status", "200"), "status", 200, 599)
        delay_ms = _int_control(controls.get("delay_ms", "0"), "delay_ms", 0, MAX_DELAY_MS)
        size = controls.get("size")
        body_size = None if size is None else _int_control(size, "size", 0, MAX_BODY_SIZE)
    except BadControl as exc:
        return Reply(400, [*base, (b"content-type", b"text/plain")], f"{exc}\n".encode(), 0.0)
    echoed = [
        (b"x-echo-" + k.lower(), v) for k, v in request.headers if k.lower() not in _NOT_ECHOED
    ]
    if controls.get("format") == "json":
        content_type, body = b"application/json", _describe(request, served_by)
    elif body_size is not None:
        content_type, body = b"application/octet-stream", b"x" * body_size
    else:
        content_type, body = b"application/octet-stream", request.body
    headers = [*base, (b"content-type", content_type), *echoed]
    return Reply(status, headers, body, delay_ms / 1000.0)


UNCOUNTED = frozenset({b"/healthz", b"/stats"})


@dataclass
class FaultInjector:
    """The app's own counters, and `--fail-every N`: every Nth counted request gets 503."""

    every: int = 0  # 0: never
    requests: int = 0
    injected: int = 0

    def answer(self, request: Request, served_by: str) -> Reply:
        """build_reply's answer, or 503 when this request is an Nth; /stats: the counters."""
        path = request.target.partition(b"?")[0]
        if path == b"/stats":
            body = json.dumps({"requests": self.requests, "injected_503": self.injected})
            headers = [(b"x-served-by", served_by.encode()), (b"content-type", b"application/json")]
            return Reply(200, headers, body.encode() + b"\n", 0.0)
        reply = build_reply(request, served_by)
        if path in UNCOUNTED:
            return reply
        self.requests += 1
        if self.every and self.requests % self.every == 0:
            self.injected += 1
            return replace(reply, status=503, body=b"injected 503\n", delay_s=0.0)
        return reply


def send_within_window(
    conn: h2.connection.H2Connection, stream_id: int, body: memoryview
) -> memoryview:
    """Queue DATA frames for as much of `body` as flow control allows, ending the stream with
    its last byte; return what is left for the next WINDOW_UPDATE."""
    while body:
        window = conn.local_flow_control_window(stream_id)
        chunk = min(window, conn.max_outbound_frame_size, len(body))
        if chunk <= 0:
            break
        conn.send_data(stream_id, body[:chunk].tobytes(), end_stream=chunk == len(body))
        body = body[chunk:]
    return body


def _head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)


class Http1Handler:
    """One HTTP/1.1 connection: requests are answered strictly in order (keep-alive, pipelining)."""

    def __init__(self, transport: asyncio.Transport, served_by: str, faults: FaultInjector) -> None:
        self.transport = transport
        self.served_by = served_by
        self.faults = faults
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.replying = False

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process_events()

    def eof_received(self) -> None:
        self.conn.receive_data(b"")
        self._process_events()

    def _process_events(self) -> None:
        while not self.replying and not self.transport.is_closing():
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(exc.error_status_hint)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if _head_size(event) > MAX_HEADER_BYTES:
                    # h11 bounds only a head still incomplete; one that arrived whole is
                    # checked here.
                    self._reject(431)
                    return
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_BODY_SIZE:
                    self._reject(413)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _answer(self) -> None:
        assert self.request is not None
        request = Request(
            self.request.method,
            self.request.target,
            list(self.request.headers),
            bytes(self.body),
            "HTTP/1.1",
            _peer(self.transport),
        )
        reply = self.faults.answer(request, self.served_by)
        self.replying = True
        if reply.delay_s > 0:
            asyncio.get_running_loop().call_later(reply.delay_s, self._send, reply)
        else:
            self._send(reply)

    def _send(self, reply: Reply) -> None:
        if self.transport.is_closing():
            return
        headers = [
            *server_headers(),
            *reply.headers,
            (b"content-length", str(len(reply.body)).encode()),
        ]
        response = h11.Response(
            status_code=reply.status, headers=headers, reason=reason_phrase(reply.status)
        )
        self.transport.write(
            self.conn.send(response)
            + self.conn.send(h11.Data(data=reply.body))
            + self.conn.send(h11.EndOfMessage())
        )
        self.replying = False
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self._process_events()

    def _reject(self, status: int) -> None:
        """Answer a protocol error if the state machine still allows a response, then close."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"malformed request ({status})\n".encode()
            headers = [
                *server_headers(),
                (b"x-served-by", self.served_by.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                reason = reason_phrase(status)
                response = self.conn.send(
                    h11.Response(status_code=status, headers=headers, reason=reason)
                )
                self.transport.write(response + self.conn.send(h11.Data(data=body)))
            except h11.LocalProtocolError:
                pass  # the state machine refused: closing is all that is left
        self.transport.close()


class Http2Handler:
    """One HTTP/2 connection (prior knowledge, cleartext); streams are answered independently."""

    def __init__(self, transport: asyncio.Transport, served_by: str, faults: FaultInjector) -> None:
        self.transport = transport
        self.served_by = served_by
        self.faults = faults
        # Inbound headers are validated (clients may be anything); our own outbound ones are
        # well-formed by construction, and validating them costs a third of h2's CPU time.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())
        self.requests: dict[int, tuple[Headers, bytearray]] = {}
        # Response bytes still waiting for flow-control window, per stream.
        self.pending: dict[int, memoryview] = {}

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.transport.close()
            return
        for event in events:
            self._handle(event)
        self._flush()

    def eof_received(self) -> None:
        self.transport.close()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = (list(event.headers or []), bytearray())
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self.requests.get(event.stream_id)
            if stream is None:
                return
            stream[1].extend(event.data or b"")
            if len(stream[1]) > MAX_BODY_SIZE:
                del self.requests[event.stream_id]
                self.conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, h2.events.StreamEnded):
            self._answer(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
            self.pending.pop(event.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in list(self.pending):
                self._send_body(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.transport.close()

    def _answer(self, stream_id: int) -> None:
        headers, body = self.requests.pop(stream_id, ([], bytearray()))
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        request = Request(
            pseudo.get(b":method", b"GET"),
            pseudo.get(b":path", b"/"),
            [(k, v) for k, v in headers if not k.startswith(b":")],
            bytes(body),
            "HTTP/2",
            _peer(self.transport),
        )
        reply = self.faults.answer(request, self.served_by)
        if reply.delay_s > 0:
            asyncio.get_running_loop().call_later(reply.delay_s, self._send, stream_id, reply)
        else:
            self._send(stream_id, reply)

    def _send(self, stream_id: int, reply: Reply) -> None:
        if self.transport.is_closing():
            return
        headers = [
            (b":status", str(reply.status).encode()),
            *server_headers(),
            *reply.headers,
            (b"content-length", str(len(reply.body)).encode()),
        ]
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not reply.body)
        except h2.exceptions.StreamClosedError:
            return  # the client reset the stream while we were delaying
        if reply.body:
            self.pending[stream_id] = memoryview(reply.body)
            self._send_body(stream_id)
        self._flush()

    def _send_body(self, stream_id: int) -> None:
        """Send what flow control allows of the pending body; the rest waits for WINDOW_UPDATE."""
        try:
            rest = send_within_window(self.conn, stream_id, self.pending[stream_id])
        except h2.exceptions.StreamClosedError:
            rest = memoryview(b"")
        if rest:
            self.pending[stream_id] = rest
        else:
            del self.pending[stream_id]

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""


class EchoProtocol(asyncio.Protocol):
    """Sniffs a connection's first bytes for the HTTP/2 preface, then hands off to a handler."""

    def __init__(self, served_by: str, faults: FaultInjector | None = None) -> None:
        self.served_by = served_by
        self.faults = faults if faults is not None else FaultInjector()
        self.transport: asyncio.Transport | None = None
        self.handler: Http1Handler | Http2Handler | None = None
        self.sniffed = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            data = self._sniff(data)
            if self.handler is None:
                return
        try:
            self.handler.data_received(data)
        except Exception as exc:  # a bug on one connection must not take the server down
            print(f"http_echo: closing connection after error: {exc!r}", file=sys.stderr)
            assert self.transport is not None
            self.transport.close()

    def _sniff(self, data: bytes) -> bytes:
        """Buffer until the bytes either are or cannot be the HTTP/2 preface; pick a handler."""
        assert self.transport is not None
        self.sniffed += data
        common = min(len(self.sniffed), len(H2_PREFACE))
        if self.sniffed[:common] != H2_PREFACE[:common]:
            self.handler = Http1Handler(self.transport, self.served_by, self.faults)
        elif len(self.sniffed) >= len(H2_PREFACE):
            self.handler = Http2Handler(self.transport, self.served_by, self.faults)
        else:
            return b""
        data, self.sniffed = self.sniffed, b""
        return data

    def eof_received(self) -> bool | None:
        """Keep the transport half-open: the handler closes it once pending replies are out."""
        if self.handler is None:
            return False
        self.handler.eof_received()
        return True


async def serve(
    host: str, port: int, served_by: str, ready: Callable[[int], None], fail_every: int = 0
) -> None:
    """Serve forever; `ready` gets the bound port (useful with port 0) once accepting."""
    loop = asyncio.get_running_loop()
    faults = FaultInjector(fail_every)  # one for the process: its counters span connections
    server = await loop.create_server(
        lambda: EchoProtocol(served_by, faults), host, port, reuse_address=True, backlog=1024
    )
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    parser.add_argument(
        "--name",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="pod name reported in x-served-by (default: $POD_NAME or the hostname)",
    )
    parser.add_argument(
        "--fail-every",
        type=_non_negative,
        default=0,
        metavar="N",
        help="answer 503 to every Nth request (counting from 1; default 0: never)",
    )
    return parser.parse_args(argv)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def announce(port: int) -> None:
        print(f"http_echo listening on {args.bind}:{port} as {args.name}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.bind, args.port, args.name, announce, args.fail_every))


if __name__ == "__main__":
    main()
