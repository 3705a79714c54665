"""CPU time and memory of running processes, sampled from /proc in a background thread,
and the whole machine's CPU time by kind (user, system, softirq...) from /proc/stat.

A process's CPU is split into user and system time (utime, stime), so that a proxy's own
work shows apart from the kernel work its sockets cause. Network stack work done in softirq
context (NAPI, conntrack, NAT, tunnels, tc BPF) is charged to whichever process the CPU
happened to run, or to ksoftirqd: only the machine's softirq time sees all of it. The
machine figures count every process on the machine, other users' included.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.measure.rows import Measurement

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BYTES_PER_KB = 1024


@dataclass(frozen=True)
class Reading:
    """CPU seconds used so far (user and system) and resident memory, of a process (and
    maybe its subtree)."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds

    def __add__(self, other: Reading) -> Reading:
        return Reading(
            self.user_seconds + other.user_seconds,
            self.system_seconds + other.system_seconds,
            self.rss_bytes + other.rss_bytes,
        )


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
    # fields[11], [12]: utime, stime; [13], [14]: cutime, cstime (reaped children)
    user, system = int(fields[11]), int(fields[12])
    if reaped:
        user, system = user + int(fields[13]), system + int(fields[14])
    rss = _rss_bytes((proc / str(pid) / "status").read_text())
    return Reading(user / CLOCK_TICKS, system / CLOCK_TICKS, rss)


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
        total = total + reading
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
        """cpu_seconds, cpu_user_seconds, cpu_system_seconds (s) and cpu_percent,
        cpu_user_percent, cpu_system_percent (percent of one CPU) between the first and the
        last reading; rss_max_bytes and rss_mean_bytes (bytes). Nothing if never read."""
        if not self.readings:
            return []
        labels = {"process": label}
        first, last = self.readings[0], self.readings[-1]
        spent = {
            "cpu": last.cpu_seconds - first.cpu_seconds,
            "cpu_user": last.user_seconds - first.user_seconds,
            "cpu_system": last.system_seconds - first.system_seconds,
        }
        wall = self.times[-1] - self.times[0]
        rss = [reading.rss_bytes for reading in self.readings]
        rows = [Measurement(f"{kind}_seconds", cpu, "s", labels) for kind, cpu in spent.items()]
        if wall > 0:
            rows += [
                Measurement(f"{kind}_percent", 100.0 * cpu / wall, "percent", labels)
                for kind, cpu in spent.items()
            ]
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
        self,
        pids: dict[str, int],
        interval: float = 0.2,
        *,
        children: bool = False,
        machine: bool = False,
    ) -> None:
        """`children`: count each process's descendants (live ones and reaped ones) too.
        `machine`: also the whole machine's CPU time by kind over the block (MachineCpu)."""
        self.pids = dict(pids)
        self.machine = MachineCpu() if machine else None
        self.interval = interval
        self.children = children
        self.series = {label: Series() for label in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)

    def __enter__(self) -> ResourceSampler:
        if self.machine is not None:
            self.machine.start()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self.machine is not None:
            self.machine.stop()

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
        rows = [row for label, s in self.series.items() for row in s.measurements(label)]
        return rows + (self.machine.measurements() if self.machine is not None else [])


# /proc/stat's "cpu" line: the fields in order (proc(5)); guest time is already in user.
PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
MACHINE_KINDS = ("user", "nice", "system", "irq", "softirq", "steal", "idle", "iowait")
MACHINE_LABELS = {"process": "machine", "scope": "machine (every process, other users' too)"}


def read_proc_stat(text: str) -> dict[str, float]:
    """Seconds by kind from /proc/stat's aggregate "cpu" line, summed over CPUs."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1 : 1 + len(PROC_STAT_FIELDS)]]
            return {k: v / CLOCK_TICKS for k, v in zip(PROC_STAT_FIELDS, values, strict=False)}
    raise ValueError("no aggregate cpu line in /proc/stat")


class MachineCpu:
    """The machine's CPU seconds by kind between start() and stop() (/proc/stat deltas)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.started = self.stopped = 0.0

    def _read(self) -> dict[str, float]:
        return read_proc_stat((self.proc / "stat").read_text())

    def start(self) -> None:
        self.before, self.started = self._read(), time.monotonic()

    def stop(self) -> None:
        self.after, self.stopped = self._read(), time.monotonic()

    def measurements(self) -> list[Measurement]:
        """machine_<kind>_seconds per kind, machine_busy_seconds (all but idle and iowait)
        and machine_busy_percent (percent of one CPU over the wall time), label
        process=machine."""
        if not self.before or not self.after:
            return []
        spent = {k: self.after.get(k, 0.0) - self.before.get(k, 0.0) for k in MACHINE_KINDS}
        busy = sum(v for k, v in spent.items() if k not in ("idle", "iowait"))
        rows = [
            Measurement(f"machine_{kind}_seconds", value, "s", MACHINE_LABELS)
            for kind, value in spent.items()
        ]
        rows.append(Measurement("machine_busy_seconds", busy, "s", MACHINE_LABELS))
        wall = self.stopped - self.started
        if wall > 0:
            rows.append(
                Measurement("machine_busy_percent", 100 * busy / wall, "percent", MACHINE_LABELS)
            )
        return rows
