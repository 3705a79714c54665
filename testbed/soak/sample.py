"""What the soak samples of each proxy process: open fds, RSS, CPU and pooled HBONE
connections, as tidy rows (time_s, proxy, metric, value).

- fds: the entries of /proc/PID/fd.
- rss_bytes, cpu_seconds: testbed.measure.resources.read_process; cpu_percent is the CPU
  used between two samples over the time between them (percent of one CPU).
- hbone_connections: the process's established TCP connections to port 15008 (HBONE), read
  with `ss -p` in every namespace of the cluster: the proxies' admin port has no pool figure
  (config_dump shows config, /connections the proxied connections, 15020 counters of
  opened/closed connections, not of pooled HBONE ones), and the pool's sockets live in the
  pods' namespaces (inpod: each pod's outbound leaves from the pod's own address).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.measure.resources import read_process
from testbed.netlab import Netns

HBONE_PORT = 15008
_PID = re.compile(r"pid=(\d+)")


@dataclass(frozen=True)
class Row:
    time_s: float  # since the soak started
    proxy: str
    metric: str
    value: float


def open_fds(pid: int, proc: Path = Path("/proc")) -> int:
    return len(os.listdir(proc / str(pid) / "fd"))


def hbone_connections_by_pid(ss_output: str) -> dict[int, int]:
    """`ss -Htnp state established '( dport = :15008 )'` lines -> established count per pid
    (a socket shared by several processes counts for each)."""
    counts: dict[int, int] = {}
    for line in ss_output.splitlines():
        for pid in {int(p) for p in _PID.findall(line)}:
            counts[pid] = counts.get(pid, 0) + 1
    return counts


def hbone_connections(namespaces: Iterable[Netns]) -> dict[int, int]:
    """Established connections to port 15008 per pid, over `namespaces`."""
    argv = ["ss", "-Htnp", "state", "established", f"( dport = :{HBONE_PORT} )"]
    total: dict[int, int] = {}
    for netns in namespaces:
        done = netns.run(argv, check=False, timeout=10)
        for pid, count in hbone_connections_by_pid(done.stdout).items():
            total[pid] = total.get(pid, 0) + count
    return total


class ProxySampler:
    """One call of `sample(at)` reads every proxy once; `rows` accumulates what was read."""

    def __init__(self, namespaces: list[Netns]) -> None:
        self.namespaces = namespaces
        self.rows: list[Row] = []
        self._last_cpu: dict[str, tuple[float, float]] = {}

    def sample(self, at: float, proxies: dict[str, int]) -> None:
        pooled = hbone_connections(self.namespaces)
        for label, pid in sorted(proxies.items()):
            try:
                reading = read_process(pid)
                fds = open_fds(pid)
            except OSError:
                continue  # ended between listing and reading: its series has a gap
            self.rows += [
                Row(at, label, "fds", float(fds)),
                Row(at, label, "rss_bytes", float(reading.rss_bytes)),
                Row(at, label, "cpu_seconds", reading.cpu_seconds),
                Row(at, label, "hbone_connections", float(pooled.get(pid, 0))),
            ]
            last = self._last_cpu.get(label)
            if last is not None and at > last[0]:
                percent = 100.0 * (reading.cpu_seconds - last[1]) / (at - last[0])
                self.rows.append(Row(at, label, "cpu_percent", percent))
            self._last_cpu[label] = (at, reading.cpu_seconds)
