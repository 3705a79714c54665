"""The project's TCP request/response workload (netperf TCP_RR / TCP_CRR-like).

    python -m testbed.workloads.rr server --port P [--host 0.0.0.0]
    python -m testbed.workloads.rr client --host H --port P [--size 64] [--duration 5]
                                          [--warmup 0.1] [--new-connection]

Wire protocol: the client opens with a 5-byte header (message size, uint32 big-endian;
flags, uint8), then sends messages of exactly that size; the server echoes each one back.
With the ONE_SHOT flag (--new-connection) the connection carries a single message, after
which the server closes first, so that TIME_WAIT sockets pile up on the server's fixed port
rather than exhausting the client's ephemeral ports.

The client prints one JSON object: round-trip (and with --new-connection, connect and whole
transaction) time summaries in microseconds, with nearest-rank percentiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from testbed.measure.rows import Summary

HEADER = struct.Struct("!IB")
ONE_SHOT = 1
MAX_SIZE = 16 * 1024 * 1024
# Bounds how long a one-shot connection, handled in the accept loop, may stall the server.
ONE_SHOT_TIMEOUT = 5.0
NS_PER_US = 1000.0


def recv_exact(sock: socket.socket, view: memoryview, size: int) -> bool:
    """Fill view[:size] from sock. False on a clean end of stream before the first byte;
    ConnectionError on one in the middle of a message."""
    received = sock.recv_into(view, size)
    if received == size:  # the usual case, kept to one call
        return True
    if received == 0:
        return False
    while received < size:
        chunk = sock.recv_into(view[received:], size - received)
        if chunk == 0:
            raise ConnectionError(f"peer closed after {received} of {size} bytes")
        received += chunk
    return True


def _tcp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# --- server ---------------------------------------------------------------------------------


def serve(host: str, port: int) -> None:
    """Accept forever: one thread per persistent connection, one-shot ones inline."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=1024)
    print(json.dumps({"listening": {"host": host, "port": port}}), flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            _accept_one(conn)
        except (OSError, ValueError) as error:
            print(json.dumps({"connection_error": str(error)}), file=sys.stderr, flush=True)
            conn.close()


def _accept_one(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.settimeout(ONE_SHOT_TIMEOUT)
    header = bytearray(HEADER.size)
    if not recv_exact(conn, memoryview(header), HEADER.size):
        conn.close()
        return
    size, flags = HEADER.unpack(header)
    if not 0 < size <= MAX_SIZE:
        raise ValueError(f"message size {size} out of range")
    if flags & ONE_SHOT:
        with conn:
            _echo(conn, size, once=True)
        return
    conn.settimeout(None)  # a timeout makes every recv poll first; keep the loop plain
    threading.Thread(target=_echo_until_closed, args=(conn, size), daemon=True).start()


def _echo(conn: socket.socket, size: int, *, once: bool) -> None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while recv_exact(conn, view, size):
        conn.sendall(view)
        if once:
            return


def _echo_until_closed(conn: socket.socket, size: int) -> None:
    # OSError: the client went away mid-message, nothing left to answer.
    with conn, contextlib.suppress(OSError):
        _echo(conn, size, once=False)


# --- client ---------------------------------------------------------------------------------


def ping_pong(sock: socket.socket, size: int, deadline_ns: int) -> list[int]:
    """Send `size`-byte messages and wait for each echo until `deadline_ns`; RTTs in ns."""
    message = bytes(size)
    view = memoryview(bytearray(size))
    clock, send = time.perf_counter_ns, sock.sendall
    samples: list[int] = []
    record = samples.append
    while True:
        start = clock()
        send(message)
        if not recv_exact(sock, view, size):
            raise ConnectionError("server closed the connection")
        end = clock()
        record(end - start)
        if end >= deadline_ns:
            return samples


class Transaction:
    """One TCP_CRR transaction: connect, one request/response, wait for the server's close."""

    def __init__(self, address: tuple[Any, ...], family: int, size: int) -> None:
        self.address, self.family, self.size = address, family, size
        self.request = HEADER.pack(size, ONE_SHOT) + bytes(size)
        self.view = memoryview(bytearray(size))

    def __call__(self) -> tuple[int, int, int]:
        """(connect, request/response, whole transaction) durations in ns."""
        clock = time.perf_counter_ns
        start = clock()
        with _tcp_socket(self.family) as sock:
            sock.connect(self.address)
            connected = clock()
            sock.sendall(self.request)
            if not recv_exact(sock, self.view, self.size):
                raise ConnectionError("server closed before answering")
            answered = clock()
            sock.recv(1)  # the server's FIN: it closes first and keeps the TIME_WAIT
        return connected - start, answered - connected, clock() - start


def _resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, address


def _summaries(**samples_ns: list[int]) -> dict[str, dict[str, float]]:
    return {
        f"{name}_us": Summary.from_samples([s / NS_PER_US for s in samples]).to_dict()
        for name, samples in samples_ns.items()
    }


def run_rr(host: str, port: int, size: int, duration: float, warmup: float) -> dict[str, Any]:
    """Ping-pong on one persistent connection; the warm-up's samples are dropped."""
    family, address = _resolve(host, port)
    with _tcp_socket(family) as sock:
        sock.connect(address)
        sock.sendall(HEADER.pack(size, 0))
        ping_pong(sock, size, time.perf_counter_ns() + int(warmup * 1e9))
        start = time.perf_counter_ns()
        samples = ping_pong(sock, size, start + int(duration * 1e9))
        elapsed = (time.perf_counter_ns() - start) / 1e9
    counts = {"requests": len(samples), "request_rate": len(samples) / elapsed}
    return {"mode": "rr", "size": size, "elapsed_s": elapsed, **counts, **_summaries(rtt=samples)}


def _repeat(transaction: Callable[[], tuple[int, int, int]], deadline_ns: int) -> dict[str, Any]:
    connects: list[int] = []
    rtts: list[int] = []
    totals: list[int] = []
    errors: list[str] = []
    while time.perf_counter_ns() < deadline_ns:
        try:
            connect, rtt, total = transaction()
        except OSError as error:
            errors.append(str(error))
            continue
        connects.append(connect)
        rtts.append(rtt)
        totals.append(total)
    return {"connect": connects, "rtt": rtts, "transaction": totals, "errors": errors}


def run_crr(host: str, port: int, size: int, duration: float, warmup: float) -> dict[str, Any]:
    """A new connection per request, back to back, for `duration` seconds."""
    family, address = _resolve(host, port)
    transaction = Transaction(address, family, size)
    _repeat(transaction, time.perf_counter_ns() + int(warmup * 1e9))
    start = time.perf_counter_ns()
    result = _repeat(transaction, start + int(duration * 1e9))
    elapsed = (time.perf_counter_ns() - start) / 1e9
    errors = result.pop("errors")
    if not result["transaction"]:
        raise ConnectionError(f"no transaction succeeded: {errors[:3]}")
    count = len(result["transaction"])
    counts = {"connections": count, "connect_rate": count / elapsed, "errors": len(errors)}
    return {
        "mode": "crr",
        "size": size,
        "elapsed_s": elapsed,
        **counts,
        "first_errors": errors[:3],
        **_summaries(**result),
    }


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.workloads.rr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server", help="echo fixed-size messages")
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--port", type=int, required=True)
    client = commands.add_parser("client", help="measure round trips, print JSON")
    client.add_argument("--host", required=True)
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--size", type=int, default=64, help="message size in bytes")
    client.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    client.add_argument("--warmup", type=float, default=0.1, help="seconds not measured")
    client.add_argument(
        "--new-connection", action="store_true", help="one connection per request (TCP_CRR)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "server":
        serve(args.host, args.port)
        return 0
    if not 0 < args.size <= MAX_SIZE:
        print(json.dumps({"error": f"--size must be in 1..{MAX_SIZE}"}), flush=True)
        return 2
    run = run_crr if args.new_connection else run_rr
    try:
        report = run(args.host, args.port, args.size, args.duration, args.warmup)
    except OSError as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
