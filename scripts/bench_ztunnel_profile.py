#!/usr/bin/env python3
"""Where the ztunnels' CPU goes during a single-stream iperf3, cross-node (two_nodes, inpod).

Builds the cluster, runs iperf3 for `--seconds` and meanwhile samples both ztunnel processes
with py-spy (`--native` adds C frames: OpenSSL, uvloop), then prints each process's hottest
frames by own time and the share of time in a few groups (TLS, HTTP/2 + HBONE, the event
loop and sockets). Raw py-spy output stays in `--out`.

    .venv/bin/python scripts/bench_ztunnel_profile.py [--seconds 10] [--native]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
from pathlib import Path

from testbed.cluster.cluster import Cluster
from testbed.cluster.loader import load_topology
from testbed.measure.iperf import run_throughput
from testbed.redirect.registry import create_mode

GROUPS = {
    "TLS (SSLObject read/write, MemoryBIO)": ("SSLObject", "tls.py", "ssl.py"),
    "HTTP/2 + HBONE (protocol, frames, flow)": ("protocol.py", "frames.py", "flow.py", "hpack"),
    "driver (connection.py, stream.py, memory.py)": ("connection.py", "stream.py", "memory.py"),
}


def summarize(raw: Path, top: int = 12) -> str:
    own: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        own[frames[-1]] += n
        for group, needles in GROUPS.items():
            if any(needle in frames[-1] for needle in needles):
                groups[group] += n
    lines = [f"{raw.name}: {total} samples"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += [f"  group {n / total:6.1%}  {group}" for group, n in groups.items()]
    rest = total - sum(groups.values())
    lines.append(f"  group {rest / total:6.1%}  everything else (event loop, syscalls, idle)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ztunnel-profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    with Cluster(load_topology("two_nodes"), create_mode("inpod"), name="hbone-prof") as cluster:
        client, server = cluster.pair("cross-node")
        result: list[float] = []
        load = threading.Thread(
            target=lambda: result.append(
                run_throughput(client, server, server.ip, duration=args.seconds + 2)[0].value
            )
        )
        load.start()
        spies = []
        for label, pid in cluster.proxy_pids().items():
            raw = args.out / f"{label}.raw"
            argv = [str(spy), "record", "-p", str(pid), "-d", str(args.seconds), "-r", "250"]
            argv += ["--format", "raw", "-o", str(raw), *(["--native"] if args.native else [])]
            spies.append((raw, subprocess.Popen(argv, stdout=subprocess.DEVNULL)))
        for _, proc in spies:
            proc.wait()
        load.join()
    print(f"iperf3: {result[0] / 1e9:.2f} Gbit/s while profiled")
    for raw, _ in spies:
        print(summarize(raw))


if __name__ == "__main__":
    main()
