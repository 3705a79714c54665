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
from dataclasses import dataclass
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
READY = "ready"  # printed by a proxy process once it listens


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
    print(READY, flush=True)
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
    print(READY, flush=True)

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
def process(argv: list[str], await_ready: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv`; with `await_ready`, return once it printed READY (a proxy of ours).

    Proxies are not probed with a connection: a probe through the chain would reach the
    iperf3 server, which then refuses the real test as busy."""
    output = subprocess.PIPE if await_ready else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.DEVNULL)
    try:
        if await_ready and proc.stdout is not None and proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{argv} exited with {proc.wait()} before getting ready")
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
def chain(target_port: int, certs: Path, pin: bool) -> Iterator[tuple[int, list[int]]]:
    """Start inbound + outbound proxies towards `target_port`; yields (outbound port, pids)."""
    hbone_port, out_port = free_port(), free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    inbound = pinned(0 if pin else None, [*me, "inbound", str(hbone_port), str(certs)])
    target = f"{LOCALHOST}:{target_port}"
    outbound = pinned(
        1 if pin else None, [*me, "outbound", str(out_port), str(hbone_port), target, str(certs)]
    )
    with process(inbound, True) as inbound_proc, process(outbound, True) as outbound_proc:
        yield out_port, [inbound_proc.pid, outbound_proc.pid]  # taskset execs: same pids


def iperf3_gbps(port: int, seconds: int, attempts: int = 3) -> float:
    """Single-stream throughput; retried because the iperf3 server is sometimes still busy."""
    argv = ["iperf3", "-J", "-c", LOCALHOST, "-p", str(port), "-t", str(seconds)]
    for _ in range(attempts):
        run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
        result = json.loads(run.stdout or "{}")
        if "sum_received" in result.get("end", {}):
            return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
        print(f"iperf3 failed: {result.get('error', run.stderr.strip())}", file=sys.stderr)
        time.sleep(2)
    raise RuntimeError("iperf3 kept failing")


def sockperf_p50_us(port: int, seconds: int) -> float:
    argv = ["sockperf", "pp", "--tcp", "--full-rtt", "-i", LOCALHOST, "-p", str(port)]
    out = subprocess.run(
        [*argv, "-t", str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    match = re.search(r"percentile 50\.000 =\s*([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no p50 in sockperf output:\n{out}")
    return float(match.group(1))


def cpu_and_wait(pids: list[int]) -> tuple[float, float]:
    """Seconds the processes ran, and waited runnable for a CPU (/proc/<pid>/schedstat)."""
    ran = waited = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


@dataclass
class Sample:
    gbps: float
    rtt_us: float
    proxy_cpu: float = 0.0  # CPU seconds of both proxies per second of iperf3
    proxy_wait: float = 0.0  # seconds both proxies waited for a CPU, per second of iperf3


def measure_direct(ports: tuple[int, int], seconds: int) -> Sample:
    return Sample(iperf3_gbps(ports[0], seconds), sockperf_p50_us(ports[1], min(seconds, 5)))


def measure_chain(ports: tuple[int, int], certs: Path, pin: bool, seconds: int) -> Sample:
    with chain(ports[0], certs, pin) as (port, pids):
        ran, waited = cpu_and_wait(pids)
        gbps = iperf3_gbps(port, seconds)
        ran_after, waited_after = cpu_and_wait(pids)
    with chain(ports[1], certs, pin) as (port, _):
        rtt = sockperf_p50_us(port, min(seconds, 5))
    return Sample(gbps, rtt, (ran_after - ran) / seconds, (waited_after - waited) / seconds)


def benchmark(reps: int, seconds: int) -> None:
    ports = (free_port(), free_port())  # iperf3, sockperf
    servers = [
        ["iperf3", "-s", "-p", str(ports[0])],
        ["sockperf", "sr", "--tcp", "-i", LOCALHOST, "-p", str(ports[1])],
    ]
    results: dict[str, list[Sample]] = {"direct": [], "unpinned": [], "pinned": []}
    with tempfile.TemporaryDirectory() as tmp, process(servers[0]), process(servers[1]):
        certs = Path(tmp)
        pki = TestPki(certs)
        pki.identity(*SERVER_ID)
        pki.identity(*CLIENT_ID)
        wait_listening(ports[0])
        time.sleep(0.5)  # sockperf's server does not like probe connections
        for rep in range(reps):
            results["direct"].append(measure_direct(ports, seconds))
            results["unpinned"].append(measure_chain(ports, certs, False, seconds))
            results["pinned"].append(measure_chain(ports, certs, True, seconds))
            print(f"rep {rep + 1}: " + "; ".join(f"{k} {v[-1]}" for k, v in results.items()))
    report(results)


def report(results: dict[str, list[Sample]]) -> None:
    def median(label: str, field: str) -> float:
        return float(statistics.median(getattr(sample, field) for sample in results[label]))

    direct_gbps, direct_rtt = median("direct", "gbps"), median("direct", "rtt_us")
    print(f"\nmedians over {len(results['direct'])} reps: iperf3 single stream, sockperf p50 RTT")
    print("proxy cpu/wait: CPU-seconds the two proxies ran / waited for a CPU, per second")
    header = f"{'path':<10}{'Gbit/s':>8}{'ratio':>7}{'RTT us':>8}{'added':>7}{'cpu':>6}{'wait':>6}"
    print(header)
    for label in results:
        gbps, rtt = median(label, "gbps"), median(label, "rtt_us")
        print(
            f"{label:<10}{gbps:>8.2f}{gbps / direct_gbps:>7.2f}{rtt:>8.1f}{rtt - direct_rtt:>7.1f}"
            f"{median(label, 'proxy_cpu'):>6.2f}{median(label, 'proxy_wait'):>6.2f}"
        )
    print(f"cpus: {os.cpu_count()}; pinned: inbound proxy on cpu0, outbound proxy on cpu1;")
    print("iperf3/sockperf unpinned; 1-minute load average at the end:", os.getloadavg()[0])


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
