"""`testbed bench`: the data plane against `none` and a native mTLS proxy, in one sitting.

Builds a two_nodes cluster per mode (plus one for `none`, which also carries the native peer:
HAProxy as an mTLS tunnel between the two nodes, see native.py), keeps them all up and runs
the repetitions interleaved (none, inpod, native, none, inpod, native, ...) so that every arm
sees the same machine load. Each repetition measures cross-node, with the project's own
measurement code: single-stream iperf3 throughput, request/response p50/p99 on one connection,
new connections per second, HTTP 1 KiB POSTs at 1000 rps over 1 and 16 connections
(p50/p90/p99), and the proxies' CPU (per GB during iperf3, per 1000 rps during HTTP) and RSS.
Prints a table (median, min-max, coefficient of variation, ratio to none and to the native
peer) and writes tidy rows (rows.csv) and the summary (summary.csv).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bench.figures import (
    HTTP_CONNECTIONS,
    Sample,
    missing_figures,
    table,
    write_rows,
    write_summary,
)
from testbed.bench.native import haproxy_tunnel
from testbed.cluster.cluster import Cluster, Pod
from testbed.cluster.loader import load_topology
from testbed.experiment.pinning import apply_pinning, describe_pinning
from testbed.measure.errors import MeasureError
from testbed.measure.http import run_http_fixed_qps
from testbed.measure.iperf import run_throughput
from testbed.measure.resources import read_process
from testbed.measure.rows import Measurement
from testbed.measure.rr import run_crr, run_rr
from testbed.netlab import NetlabError
from testbed.netlab.errors import TestbedError
from testbed.netlab.manifest import RUNS_ROOT
from testbed.redirect.registry import create_labelled_mode

NATIVE = "native"
IPERF_PORT, RR_PORT, HTTP_PORT = 5201, 7777, 8080
HTTP_QPS = 1000
PINNINGS = ("none", "split")
BRIEF = ("throughput", "rr_p50", "connections_per_s", "http16_p90")  # printed per repetition


class BenchError(TestbedError, ValueError):
    """A bad bench option (named in the message)."""


@dataclass(frozen=True)
class Durations:
    iperf: float = 10.0
    rr: float = 5.0
    crr: float = 5.0
    http: float = 5.0
    warmup: float = 1.0


QUICK = Durations(iperf=1, rr=1, crr=1, http=1, warmup=0.5)


@dataclass
class BenchOptions:
    modes: Sequence[str] = ("inpod",)
    reps: int = 5
    durations: Durations = field(default_factory=Durations)
    pinning: str = "none"
    native: bool = True
    out: Path = Path("results/bench")
    root: Path = RUNS_ROOT
    name_prefix: str = "bench"

    def check(self) -> None:
        if self.reps < 1:
            raise BenchError(f"--reps {self.reps}: expected at least 1")
        if self.pinning not in PINNINGS:
            raise BenchError(f"--pinning {self.pinning!r}: expected one of {', '.join(PINNINGS)}")
        if "none" in self.modes or NATIVE in self.modes:
            raise BenchError("--modes: none and the native peer are always measured")
        for mode in self.modes:
            create_labelled_mode(mode)  # a bad label (or a missing binary): one error, now


@dataclass(frozen=True)
class Arm:
    """What one arm measures: a client and server pod, the address to reach, the proxies."""

    name: str
    client: Any
    server: Pod
    target_ip: str
    proxy_pids: list[int]


def _value(rows: list[Measurement], metric: str) -> float:
    for row in rows:
        if row.metric == metric:
            return row.value
    raise KeyError(f"no {metric} in {[row.metric for row in rows]}")


def _cpu(pids: Sequence[int]) -> float:
    return sum(read_process(pid).cpu_seconds for pid in pids)


def _timed_cpu(
    pids: Sequence[int], action: Callable[[], list[Measurement]]
) -> tuple[list[Measurement], float]:
    before = _cpu(pids)
    rows = action()
    return rows, _cpu(pids) - before


def measure_arm(
    arm: Arm, rep: int, d: Durations, pinning: str, say: Callable[[str], None] = print
) -> list[Sample]:
    """Every figure of one arm once. A tool that fails costs only its own figures (the table
    then names them as missing), not the sitting."""
    client, server = apply_pinning(pinning, arm.client, arm.server)
    ip, pids = arm.target_ip, arm.proxy_pids
    found: dict[str, float] = {}

    def throughput() -> None:
        rows, cpu = _timed_cpu(
            pids, lambda: run_throughput(client, server, ip, duration=d.iperf, port=IPERF_PORT)
        )
        gbps = found["throughput"] = _value(rows, "throughput") / 1e9
        if pids:
            found["proxy_cpu_per_gb"] = cpu / (gbps * d.iperf / 8)

    def rr() -> None:
        rows = run_rr(client, server, ip, duration=d.rr, port=RR_PORT)
        found["rr_p50"], found["rr_p99"] = _value(rows, "rtt_p50"), _value(rows, "rtt_p99")

    def crr() -> None:
        rows = run_crr(client, server, ip, duration=d.crr, port=RR_PORT)
        found["connections_per_s"] = _value(rows, "connect_rate")

    def http(conns: int) -> None:
        rows, cpu = _timed_cpu(
            pids,
            lambda: run_http_fixed_qps(
                client, server, ip, qps=HTTP_QPS, connections=conns, duration=d.http,
                warmup=d.warmup, port=HTTP_PORT,
            ),
        )  # fmt: skip
        for q in ("p50", "p90", "p99"):
            found[f"http{conns}_{q}"] = _value(rows, f"http_{q}")
        if pids:
            krps = _value(rows, "achieved_qps") / 1000
            found[f"proxy_vcpu_per_krps_http{conns}"] = cpu / (d.warmup + d.http) / krps

    steps: list[tuple[str, Callable[[], None]]] = [
        ("iperf3", throughput), ("rr", rr), ("crr", crr),
        *((f"http {c} conn", lambda c=c: http(c)) for c in HTTP_CONNECTIONS),
    ]  # fmt: skip
    for name, step in steps:
        try:
            step()
        except (MeasureError, NetlabError, KeyError) as exc:  # NetlabError: a tool timed out
            say(f"rep {rep} {arm.name}: {name} failed, its figures are missing: {exc}")
    if pids:
        found["proxy_rss"] = sum(read_process(pid).rss_bytes for pid in pids) / 1e6
    return [Sample(rep, arm.name, name, value) for name, value in found.items()]


@contextmanager
def _cluster(mode: str, options: BenchOptions) -> Iterator[Cluster]:
    name = f"{options.name_prefix}-{mode}".replace("+", "-")[:12]
    topology = load_topology("two_nodes")
    cluster = Cluster(topology, create_labelled_mode(mode), name=name, root=options.root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _arms(stack: ExitStack, options: BenchOptions, workdir: Path) -> list[Arm]:
    arms = []
    for mode in ("none", *options.modes):
        cluster = stack.enter_context(_cluster(mode, options))
        client, server = cluster.pair("cross-node")
        pids = list(cluster.proxy_pids().values()) if mode != "none" else []
        arms.append(Arm(mode, client, server, server.ip, pids))
        if mode == "none" and options.native:
            nodes = cluster.nodes
            ports = (IPERF_PORT, RR_PORT, HTTP_PORT)
            tunnel = stack.enter_context(
                haproxy_tunnel(nodes[client.node], nodes[server.node], server.ip, ports, workdir)
            )
            arms.append(Arm(NATIVE, client, server, tunnel.address, tunnel.pids))
    return arms


def run_bench(options: BenchOptions, say: Callable[[str], None] = print) -> list[Sample]:
    """Build, measure interleaved, print the table; rows.csv and summary.csv go to `out`."""
    options.check()
    options.out.mkdir(parents=True, exist_ok=True)
    say(f"pinning: {describe_pinning(options.pinning)} (affinity of this process: "
        f"CPUs {sorted(os.sched_getaffinity(0))})")  # fmt: skip
    samples: list[Sample] = []
    started = time.monotonic()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        arms = _arms(stack, options, Path(workdir))
        say(f"built {len(arms)} arms in {time.monotonic() - started:.0f} s: "
            f"{', '.join(arm.name for arm in arms)}")  # fmt: skip
        for rep in range(1, options.reps + 1):
            for arm in arms:
                got = measure_arm(arm, rep, options.durations, options.pinning, say)
                samples += got
                brief = {s.figure: s.value for s in got}
                say(f"rep {rep} {arm.name:8} " + "  ".join(
                    f"{name} {brief[name]:.4g}" for name in BRIEF if name in brief
                ) + f"  load {_load()}")  # fmt: skip
    names = [arm.name for arm in arms]
    native = NATIVE if options.native else None
    say(table(samples, names, native))
    write_rows(options.out / "rows.csv", samples, options.pinning)
    write_summary(options.out / "summary.csv", samples, native)
    gaps = missing_figures(samples, names)
    say(f"rows: {options.out / 'rows.csv'}; took {time.monotonic() - started:.0f} s"
        + (f"; MISSING {gaps}" if gaps else ""))  # fmt: skip
    return samples


def _load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])
