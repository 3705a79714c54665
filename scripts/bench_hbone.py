#!/usr/bin/env python3
"""Loopback benchmark of the HBONE data path (127.0.0.1 only, no namespaces, no root).

    client -> [plain TCP] outbound proxy -> HBONE (TLS 1.3 + h2) -> inbound proxy -> server

Both proxies are separate processes (like two ztunnels) on uvloop. Measures single-stream
`iperf3 -J` throughput and `sockperf ping-pong --full-rtt` p50 round trip, direct vs through the
chain, with the proxies unpinned and pinned to different CPUs (taskset); prints medians over
the repetitions and the ratios.

    .venv/bin/python scripts/bench_hbone.py bench [--reps 3] [--seconds 10]

The `inbound` and `outbound` subcommands are the proxy processes the benchmark starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvloop

from testbed.mesh.hbone import (
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneServer,
    client_context,
    connect_tcp,
    server_context,
)
from testbed.mesh.hbone.testcerts import TestPki

LOCALHOST = "127.0.0.1"
SERVER_ID = ("ns-b", "sa-b")
CLIENT_ID = ("ns-a", "sa-a")


# -- proxy processes ----------------------------------------------------------------------
def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOCALHOST, port))
    sock.listen(1024)
    return sock


async def run_inbound(port: int, certs: Path) -> None:
    pki_dir = certs / f"{SERVER_ID[0]}.{SERVER_ID[1]}"
    context = server_context(
        Path(f"{pki_dir}.cert.pem"), Path(f"{pki_dir}.key.pem"), certs / "root-cert.pem"
    )

    async def on_connect(request: ConnectRequest) -> ConnectDecision:
        return ConnectDecision.accept(await connect_tcp(request.authority))

    server = HboneServer(context, on_connect)
    await server.start(_listen(port))
    await asyncio.Event().wait()


async def run_outbound(port: int, hbone_port: int, target: str, certs: Path) -> None:
    stem = certs / f"{CLIENT_ID[0]}.{CLIENT_ID[1]}"
    context = client_context(
        Path(f"{stem}.cert.pem"), Path(f"{stem}.key.pem"), certs / "root-cert.pem"
    )
    expected = {f"spiffe://cluster.local/ns/{SERVER_ID[0]}/sa/{SERVER_ID[1]}"}
    client = HboneClient()
    loop = asyncio.get_running_loop()
    listener = _listen(port)
    listener.setblocking(False)

    async def handle(sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            stream = await client.open(
                (LOCALHOST, hbone_port),
                target,
                ssl_context=context,
                expected_identities=expected,
                source=peer,
            )
        except ConnectionError as exc:
            print(f"outbound: {exc}", file=sys.stderr)
            sock.close()
            return
        await stream.relay(sock)

    tasks: set[asyncio.Task[None]] = set()
    while True:
        sock, peer = await loop.sock_accept(listener)
        task = loop.create_task(handle(sock, peer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# -- orchestration -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((LOCALHOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


@contextmanager
def chain(target_port: int, certs: Path, pin: bool) -> Iterator[int]:
    """Start inbound + outbound proxies towards `target_port`; yields the outbound port."""
    hbone_port, out_port = free_port(), free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    inbound = pinned(0 if pin else None, [*me, "inbound", str(hbone_port), str(certs)])
    target = f"{LOCALHOST}:{target_port}"
    outbound = pinned(
        1 if pin else None, [*me, "outbound", str(out_port), str(hbone_port), target, str(certs)]
    )
    with process(inbound), process(outbound):
        wait_listening(hbone_port)
        wait_listening(out_port)
        yield out_port


def iperf3_gbps(port: int, seconds: int) -> float:
    out = subprocess.run(
        ["iperf3", "-J", "-c", LOCALHOST, "-p", str(port), "-t", str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def sockperf_p50_us(port: int, seconds: int) -> float:
    out = subprocess.run(
        [
            "sockperf",
            "pp",
            "--tcp",
            "--full-rtt",
            "-i",
            LOCALHOST,
            "-p",
            str(port),
            "-t",
            f"{seconds}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    match = re.search(r"percentile 50\.000 =\s*([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no p50 in sockperf output:\n{out}")
    return float(match.group(1))


def measure(port: int, seconds: int, rr_port: int) -> tuple[float, float]:
    return iperf3_gbps(port, seconds), sockperf_p50_us(rr_port, min(seconds, 5))


def benchmark(reps: int, seconds: int) -> None:
    iperf_port, sockperf_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        pki = TestPki(certs)
        pki.identity(*SERVER_ID)
        pki.identity(*CLIENT_ID)
        servers = [
            ["iperf3", "-s", "-p", str(iperf_port)],
            ["sockperf", "sr", "--tcp", "-i", LOCALHOST, "-p", str(sockperf_port)],
        ]
        with process(servers[0]), process(servers[1]):
            wait_listening(iperf_port)
            time.sleep(0.5)  # sockperf's server does not like probe connections
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "unpinned": []}
            results["pinned cpu0/cpu1"] = []
            for rep in range(reps):
                results["direct"].append(measure(iperf_port, seconds, sockperf_port))
                for pin, label in ((False, "unpinned"), (True, "pinned cpu0/cpu1")):
                    with (
                        chain(iperf_port, certs, pin) as out_iperf,
                        chain(sockperf_port, certs, pin) as out_rr,
                    ):
                        results[label].append(measure(out_iperf, seconds, out_rr))
                print(f"rep {rep + 1}: " + ", ".join(f"{k}={v[-1]}" for k, v in results.items()))
    report(results)


def report(results: dict[str, list[tuple[float, float]]]) -> None:
    direct_gbps = statistics.median(r[0] for r in results["direct"])
    direct_rtt = statistics.median(r[1] for r in results["direct"])
    print(f"\nmedians over {len(results['direct'])} reps (iperf3 single stream, sockperf p50 RTT)")
    print(f"{'path':<20}{'Gbit/s':>9}{'ratio':>8}{'p50 RTT us':>12}{'added us':>10}")
    for label, rows in results.items():
        gbps = statistics.median(r[0] for r in rows)
        rtt = statistics.median(r[1] for r in rows)
        print(
            f"{label:<20}{gbps:>9.2f}{gbps / direct_gbps:>8.2f}{rtt:>12.1f}"
            f"{rtt - direct_rtt:>10.1f}"
        )
    print(f"cpus: {os.cpu_count()}; pinned = inbound proxy on cpu0, outbound proxy on cpu1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench")
    bench.add_argument("--reps", type=int, default=3)
    bench.add_argument("--seconds", type=int, default=10)
    inbound = sub.add_parser("inbound")
    inbound.add_argument("port", type=int)
    inbound.add_argument("certs", type=Path)
    outbound = sub.add_parser("outbound")
    outbound.add_argument("port", type=int)
    outbound.add_argument("hbone_port", type=int)
    outbound.add_argument("target")
    outbound.add_argument("certs", type=Path)
    args = parser.parse_args(sys.argv[1:] or ["bench"])
    if args.command == "inbound":
        uvloop.run(run_inbound(args.port, args.certs))
    elif args.command == "outbound":
        uvloop.run(run_outbound(args.port, args.hbone_port, args.target, args.certs))
    else:
        benchmark(args.reps, args.seconds)


if __name__ == "__main__":
    main()
