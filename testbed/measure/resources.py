"""CPU time and memory of running processes, sampled from /proc in a background thread."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from testbed.measure.rows import Measurement

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BYTES_PER_KB = 1024


@dataclass(frozen=True)
class Reading:
    """CPU seconds used so far and resident memory, of a process (and maybe its subtree)."""

    cpu_seconds: float
    rss_bytes: int


def _stat_fields(pid: int, proc: Path) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat (fields[0] is the state, [1] the parent pid)."""
    stat = (proc / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return stat[stat.rindex(")") + 2 :].split()


def read_process(pid: int, proc: Path = Path("/proc"), *, reaped: bool = False) -> Reading:
    """utime+stime (with `reaped`, also cutime+cstime: children it has waited for) from
    /proc/<pid>/stat, VmRSS from /proc/<pid>/status. ProcessLookupError (an OSError) when
    the process is gone or a zombie."""
    fields = _stat_fields(pid, proc)
    if fields[0] in ("Z", "X"):
        raise ProcessLookupError(f"process {pid} has exited")
    last = 15 if reaped else 13  # fields[11:13] utime stime, [13:15] cutime cstime
    ticks = sum(int(value) for value in fields[11:last])
    return Reading(ticks / CLOCK_TICKS, _rss_bytes((proc / str(pid) / "status").read_text()))


def _rss_bytes(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * BYTES_PER_KB
    return 0  # kernel threads have no VmRSS line


def _children_by_parent(proc: Path) -> dict[int, list[int]]:
    # Scans every process: /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN,
    # which not every kernel (this one included) has.
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name), proc)[1])
        except OSError:
            continue  # ended while scanning
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Live descendants of `pid` (children, grandchildren...)."""
    children = _children_by_parent(proc)
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found += below
        pending += below
    return found


def read_tree(pid: int, proc: Path = Path("/proc")) -> Reading:
    """`pid` plus its live descendants. Counting cutime/cstime too keeps the sum continuous
    when a child exits and is reaped: its time moves into its parent's counters."""
    total = read_process(pid, proc, reaped=True)
    for child in descendants(pid, proc):
        try:
            reading = read_process(child, proc, reaped=True)
        except OSError:
            continue  # ended between listing and reading; counted by its parent once reaped
        total = Reading(
            total.cpu_seconds + reading.cpu_seconds, total.rss_bytes + reading.rss_bytes
        )
    return total


@dataclass
class Series:
    """The readings of one labelled process, with the monotonic time of each."""

    times: list[float] = field(default_factory=list)
    readings: list[Reading] = field(default_factory=list)

    def add(self, at: float, reading: Reading) -> None:
        self.times.append(at)
        self.readings.append(reading)

    def measurements(self, label: str) -> list[Measurement]:
        """cpu_seconds (s) and cpu_percent (percent of one CPU) between the first and the last
        reading; rss_max_bytes and rss_mean_bytes (bytes). Nothing if never read."""
        if not self.readings:
            return []
        labels = {"process": label}
        cpu = self.readings[-1].cpu_seconds - self.readings[0].cpu_seconds
        wall = self.times[-1] - self.times[0]
        rss = [reading.rss_bytes for reading in self.readings]
        rows = [Measurement("cpu_seconds", cpu, "s", labels)]
        if wall > 0:
            rows.append(Measurement("cpu_percent", 100.0 * cpu / wall, "percent", labels))
        rows.append(Measurement("rss_max_bytes", float(max(rss)), "bytes", labels))
        rows.append(Measurement("rss_mean_bytes", sum(rss) / len(rss), "bytes", labels))
        return rows


class ResourceSampler:
    """Samples the CPU time and RSS of labelled processes every `interval` seconds while the
    `with` block runs (and once at each end). A process that exits keeps what was read
    before; one that was never read yields no rows.

        with ResourceSampler({"ztunnel": pid}) as sampler:
            run_the_load()
        rows = sampler.measurements()
    """

    def __init__(
        self, pids: dict[str, int], interval: float = 0.2, *, children: bool = False
    ) -> None:
        """`children`: count each process's descendants (live ones and reaped ones) too."""
        self.pids = dict(pids)
        self.interval = interval
        self.children = children
        self.series = {label: Series() for label in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)

    def __enter__(self) -> ResourceSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Read every process still running once."""
        read = read_tree if self.children else read_process
        for label, pid in self.pids.items():
            try:
                reading = read(pid)
            except OSError:
                continue  # gone: its series ends with its last reading
            self.series[label].add(time.monotonic(), reading)

    def measurements(self) -> list[Measurement]:
        return [row for label, s in self.series.items() for row in s.measurements(label)]
