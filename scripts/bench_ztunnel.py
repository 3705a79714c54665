#!/usr/bin/env python3
"""A/B benchmark of the ztunnel data path: two_nodes, mode none vs mode inpod, cross-node.

Both clusters stay up for the whole run and the modes alternate (none, inpod, none, ...), so
the two are measured in the same sitting. Each round runs a single-stream iperf3 and a
sockperf TCP ping-pong; the report gives medians, the throughput ratio inpod/none and the
added p50 round trip, with `uptime`'s load average before and after (other people's tests
on this 2-vCPU machine move the numbers: read them together with the load).

    .venv/bin/python scripts/bench_ztunnel.py [--reps 3] [--seconds 10] [--ping-seconds 5]
        [--pin-ztunnels 1] [--pin-apps 0] [--variant DIR] [--variant-env NAME=VALUE ...]

`--variant DIR` (and/or `--variant-env`) adds a third arm, "variant": inpod whose processes
start in DIR (a tree holding another `testbed` package, which `python -m` then imports before
the installed one) and with the extra environment. That gives a same-session A/B of a code
change: copy the tree, change one side, compare "inpod" with "variant".

`--pin-ztunnels CPUS` pins every thread of both ztunnel processes (taskset -a); `--pin-apps
CPUS` pins this process once the clusters are up, so the iperf3/sockperf clients and servers
it spawns inherit it (the clusters' own processes do not).
The pinning is printed with the results. "proxy CPU" is the CPU time the arm's ztunnels used
during the iperf3 run per GB received (less is better, and less noisy than the throughput).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from testbed.cluster.cluster import Cluster, Pod
from testbed.cluster.loader import load_topology
from testbed.measure.iperf import run_throughput
from testbed.measure.rows import Measurement
from testbed.measure.sockperf import run_pingpong
from testbed.redirect import create_mode


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str
    cwd: str | None = None  # where the arm's processes start (their `testbed` package)
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Target:
    client: Pod
    server: Pod
    proxy_pids: list[int]


@dataclass
class Samples:
    gbps: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    cpu_s_per_gb: list[float] = field(default_factory=list)  # proxies' CPU during iperf3


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def _value(rows: list[Measurement], metric: str) -> float:
    for row in rows:
        if row.metric == metric:
            return row.value
    raise KeyError(f"no {metric} in {[row.metric for row in rows]}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes, all their threads included."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def _cpu_set(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pin_proxies(cluster: Cluster, cpus: str) -> None:
    for label, pid in cluster.proxy_pids().items():
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, capture_output=True
        )
        print(f"  pinned {label} (pid {pid}) to CPUs {cpus}")


@contextmanager
def started_as(arm: Arm) -> Iterator[None]:
    """Processes spawned meanwhile inherit the arm's working directory and environment."""
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.environ.update(dict(arm.env))
    if arm.cwd:
        os.chdir(arm.cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


@contextmanager
def built(arm: Arm, pin_ztunnels: str | None) -> Iterator[Target]:
    mode = create_mode(arm.mode)
    cluster = Cluster(load_topology("two_nodes"), mode, name=f"hbone-{arm.name[:6]}")
    with started_as(arm):
        cluster.start()
    try:
        client, server = cluster.pair("cross-node")
        if pin_ztunnels and arm.mode != "none":
            pin_proxies(cluster, pin_ztunnels)
        yield Target(client, server, list(cluster.proxy_pids().values()))
    finally:
        cluster.stop()


def arms_from(args: argparse.Namespace) -> list[Arm]:
    arms = [Arm("none", "none"), Arm("inpod", "inpod")]
    if args.variant or args.variant_env:
        pairs = (item.partition("=") for item in args.variant_env)
        env = tuple((name, value) for name, _, value in pairs)
        arms.append(Arm("variant", "inpod", args.variant, env))
    return arms


def measure_once(target: Target, seconds: float, ping_seconds: int, samples: Samples) -> None:
    client, server = target.client, target.server
    cpu_before = cpu_seconds(target.proxy_pids)
    rows = run_throughput(client, server, server.ip, duration=seconds)
    cpu = cpu_seconds(target.proxy_pids) - cpu_before
    gbps = _value(rows, "throughput") / 1e9  # bit/s the receiver got
    samples.gbps.append(gbps)
    samples.cpu_s_per_gb.append(cpu / (gbps * seconds / 8))
    ping = run_pingpong(client, server, server.ip, duration=ping_seconds)
    samples.p50_us.append(_value(ping, "rtt_p50"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="iperf3 duration")
    parser.add_argument("--ping-seconds", type=int, default=5, help="sockperf duration")
    parser.add_argument("--pin-ztunnels", metavar="CPUS", help="taskset list for the ztunnels")
    parser.add_argument("--pin-apps", metavar="CPUS", help="CPUs for iperf3/sockperf")
    parser.add_argument("--variant", metavar="DIR", help="tree of the variant arm's testbed")
    parser.add_argument("--variant-env", metavar="NAME=VALUE", action="append", default=[])
    args = parser.parse_args()
    arms = arms_from(args)
    print(f"load average before: {load_average()}")
    print(f"pinning: ztunnels={args.pin_ztunnels or 'none'} apps={args.pin_apps or 'none'}")
    for arm in arms:
        print(f"arm {arm.name}: mode {arm.mode}, cwd {arm.cwd or os.getcwd()}, env {arm.env}")
    samples = {arm.name: Samples() for arm in arms}
    with ExitStack() as stack:
        targets = {arm.name: stack.enter_context(built(arm, args.pin_ztunnels)) for arm in arms}
        if args.pin_apps:  # only now: the clusters' own processes must not inherit it
            os.sched_setaffinity(0, _cpu_set(args.pin_apps))
        for rep in range(args.reps):
            for arm in arms:
                got = samples[arm.name]
                measure_once(targets[arm.name], args.seconds, args.ping_seconds, got)
                print(
                    f"  rep {rep + 1} {arm.name:7}: {got.gbps[-1]:6.2f} Gbit/s  "
                    f"p50 {got.p50_us[-1]:7.1f} us  proxy CPU {got.cpu_s_per_gb[-1]:5.2f} s/GB  "
                    f"load {load_average()}",
                    flush=True,
                )
                time.sleep(1)
    print(f"load average after: {load_average()}")
    report(samples)


def report(samples: dict[str, Samples]) -> None:
    base_gbps = statistics.median(samples["none"].gbps)
    base_p50 = statistics.median(samples["none"].p50_us)
    for name, got in samples.items():
        gbps, p50 = statistics.median(got.gbps), statistics.median(got.p50_us)
        print(
            f"{name:7}: median {gbps:6.2f} Gbit/s, p50 {p50:7.1f} us, "
            f"proxy CPU {statistics.median(got.cpu_s_per_gb):5.2f} s/GB; "
            f"ratio {gbps / base_gbps:.3f}x, added p50 {p50 - base_p50:+.1f} us"
        )


if __name__ == "__main__":
    main()
