"""HTTP latency at a fixed rate with no mesh, inpod, and inpod + waypoint (issue #7's numbers).

1 KiB requests at --qps over 1, 4, 16 and 64 connections from a client on node1 to a
server behind a service on node2 (the waypoint on node2 too); prints p50/p90/p99 per case
and the waypoint's CPU per 1000 requests/s and RSS.

.venv/bin/python scripts/bench_waypoint.py --qps 1000 --duration 10 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from testbed.cluster import Cluster, Topology
from testbed.cluster.waypoints import USE_WAYPOINT
from testbed.measure.http import run_http_fixed_qps
from testbed.measure.resources import read_process
from testbed.redirect import create_mode

PORT = 8080
CASES = (("none", False), ("inpod", False), ("inpod+waypoint", True))


class BenchTopology(Topology):
    name = "waypoint_bench"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        if self.params.get("waypoint"):
            self.label_namespace("default", {USE_WAYPOINT: "waypoint"})
            self.add_waypoint("waypoint", "node2")
        self.add_pod("client", "node1", labels={"app": "client"})
        self.add_pod("server", "node2", labels={"app": "server"})
        self.add_service("server", selector={"app": "server"}, ports=[PORT])


def run_case(name: str, waypoint: bool, args: argparse.Namespace) -> dict[int, list[float]]:
    mode = "none" if name == "none" else "inpod"
    rows: dict[int, list[float]] = {}
    with Cluster(BenchTopology(waypoint=waypoint), create_mode(mode)) as cluster:
        vip = cluster.services["server"].vip
        for connections in args.connections:
            pid = _waypoint_pid(cluster)
            before = read_process(pid) if pid else None
            started = time.monotonic()
            measured = run_http_fixed_qps(
                cluster.pod("client"), cluster.pod("server"), vip, qps=args.qps,
                connections=connections, duration=args.duration, payload=1024, port=PORT,
            )  # fmt: skip
            elapsed = time.monotonic() - started
            values = {m.metric: m.value for m in measured}
            achieved = values.get("achieved_qps", 0.0)
            row = [values.get("http_p50", 0.0), values.get("http_p90", 0.0),
                   values.get("http_p99", 0.0), values.get("errors", 0.0), achieved]  # fmt: skip
            if pid and before is not None:
                after = read_process(pid)
                # warmup + duration of requests at about `achieved` per second
                vcpu = (after.cpu_seconds - before.cpu_seconds) / elapsed
                row += [vcpu * 1000.0 / max(achieved, 1.0), after.rss_bytes / 2**20]
            rows[connections] = row
    return rows


def _waypoint_pid(cluster: Cluster) -> int | None:
    return cluster.proxy_pids().get("waypoint-waypoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--qps", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 16, 64])
    args = parser.parse_args()
    results: dict[tuple[str, int], list[list[float]]] = defaultdict(list)
    for _ in range(args.repeat):
        for name, waypoint in CASES:
            for connections, row in run_case(name, waypoint, args).items():
                results[(name, connections)].append(row)
    print(
        "case                 conns   p50 ms   p90 ms   p99 ms  errors  req/s"
        "  wp vCPU/1krps  wp RSS MiB"
    )
    for (name, connections), rows in results.items():
        medians = [statistics.median(column) for column in zip(*rows, strict=True)]
        extra = f"  {medians[5]:13.3f}  {medians[6]:10.1f}" if len(medians) > 5 else ""
        print(
            f"{name:20s} {connections:5d} {medians[0]:8.3f} {medians[1]:8.3f} {medians[2]:8.3f}"
            f" {medians[3]:7.0f} {medians[4]:6.0f}{extra}"
        )


if __name__ == "__main__":
    main()
