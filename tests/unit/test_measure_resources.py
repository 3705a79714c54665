from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.measure.resources import (
    CLOCK_TICKS,
    MachineCpu,
    Reading,
    ResourceSampler,
    Series,
    descendants,
    read_proc_stat,
    read_process,
    read_tree,
)


def fake_process(
    proc: Path,
    pid: int,
    *,
    ppid: int,
    ticks: tuple[int, int, int, int],
    rss_kb: int | None,
    state: str = "S",
    comm: str = "a) (b c",
) -> None:
    """A /proc/<pid> with stat and status files shaped like the kernel's."""
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    middle = " ".join(["0"] * 9)  # pgrp .. cmajflt: fields 5-13
    utime, stime, cutime, cstime = ticks
    rest = "20 0 1 0 100 2000 300"
    stat = f"{pid} ({comm}) {state} {ppid} {middle} {utime} {stime} {cutime} {cstime} {rest}\n"
    (directory / "stat").write_text(stat)
    rss = f"VmRSS:\t{rss_kb} kB\n" if rss_kb is not None else ""
    (directory / "status").write_text(f"Name:\tx\nState:\t{state}\n{rss}Threads:\t1\n")


def test_read_process_survives_odd_command_names(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, ppid=1, ticks=(300, 100, 50, 50), rss_kb=2048)
    assert read_process(10, tmp_path) == Reading(300 / CLOCK_TICKS, 100 / CLOCK_TICKS, 2048 * 1024)
    reaped = Reading(350 / CLOCK_TICKS, 150 / CLOCK_TICKS, 2048 * 1024)
    assert read_process(10, tmp_path, reaped=True) == reaped
    assert reaped.cpu_seconds == pytest.approx(500 / CLOCK_TICKS)


def test_kernel_thread_has_no_rss(tmp_path: Path) -> None:
    fake_process(tmp_path, 2, ppid=0, ticks=(1, 1, 0, 0), rss_kb=None)
    assert read_process(2, tmp_path).rss_bytes == 0


def test_zombie_and_missing_processes_are_gone(tmp_path: Path) -> None:
    fake_process(tmp_path, 11, ppid=1, ticks=(1, 1, 0, 0), rss_kb=None, state="Z")
    with pytest.raises(ProcessLookupError):
        read_process(11, tmp_path)
    with pytest.raises(OSError):
        read_process(12, tmp_path)


def test_tree_adds_live_descendants(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, ppid=1, ticks=(100, 0, 10, 0), rss_kb=1000)
    fake_process(tmp_path, 20, ppid=10, ticks=(50, 0, 0, 0), rss_kb=300)
    fake_process(tmp_path, 30, ppid=20, ticks=(5, 5, 0, 0), rss_kb=200)
    fake_process(tmp_path, 40, ppid=1, ticks=(999, 0, 0, 0), rss_kb=9999)  # not ours
    (tmp_path / "self").mkdir()  # non-numeric entries are skipped
    assert sorted(descendants(10, tmp_path)) == [20, 30]
    tree = read_tree(10, tmp_path)
    assert tree.cpu_seconds == pytest.approx(170 / CLOCK_TICKS)
    assert tree.rss_bytes == 1500 * 1024


def test_series_rows() -> None:
    series = Series()
    series.add(10.0, Reading(0.75, 0.25, 100))
    series.add(11.0, Reading(1.0, 0.25, 300))
    series.add(12.0, Reading(1.5, 0.5, 200))
    rows = {row.metric: (row.value, row.unit, row.labels) for row in series.measurements("zt")}
    label = {"process": "zt"}
    assert rows == {
        "cpu_seconds": (1.0, "s", label),
        "cpu_user_seconds": (0.75, "s", label),
        "cpu_system_seconds": (0.25, "s", label),
        "cpu_percent": (50.0, "percent", label),
        "cpu_user_percent": (37.5, "percent", label),
        "cpu_system_percent": (12.5, "percent", label),
        "rss_max_bytes": (300.0, "bytes", label),
        "rss_mean_bytes": (200.0, "bytes", label),
    }
    assert Series().measurements("never") == []


# Burns a fixed amount of CPU time, however loaded the machine is.
BUSY_LOOP = "import time\nwhile time.process_time() < {seconds}: pass\n"


def test_sampler_follows_a_busy_process_until_it_exits() -> None:
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=0.6)])
    try:
        with ResourceSampler({"busy": busy.pid, "self": os.getpid()}, interval=0.05) as sampler:
            busy.wait(timeout=10)  # it vanishes mid-sampling (a zombie until reaped)
            time.sleep(0.2)
    finally:
        busy.kill()
        busy.wait()
    rows = {(row.labels["process"], row.metric): row.value for row in sampler.measurements()}
    assert rows[("busy", "cpu_seconds")] > 0.4
    assert 0.0 < rows[("busy", "cpu_percent")] <= 110.0
    assert rows[("busy", "rss_max_bytes")] > 1_000_000
    assert rows[("self", "rss_mean_bytes")] > 1_000_000


def test_sampler_skips_a_pid_that_never_existed() -> None:
    with ResourceSampler({"ghost": 2**22 + 12345}, interval=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.measurements() == []


def test_proc_stat_line_in_seconds() -> None:
    text = "cpu  100 5 40 900 10 2 30 1 0 0\ncpu0 50 2 20 450 5 1 15 0 0 0\nintr 1\n"
    seconds = read_proc_stat(text)
    assert seconds["user"] == pytest.approx(100 / CLOCK_TICKS)
    assert seconds["softirq"] == pytest.approx(30 / CLOCK_TICKS)
    assert seconds["steal"] == pytest.approx(1 / CLOCK_TICKS)
    with pytest.raises(ValueError):
        read_proc_stat("intr 1\n")


def test_machine_cpu_is_the_delta_by_kind(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 40 900 0 0 30 0\n")
    machine = MachineCpu(tmp_path)
    machine.start()
    stat.write_text(
        f"cpu  {100 + CLOCK_TICKS} 0 {40 + CLOCK_TICKS} 950 0 0 {30 + 2 * CLOCK_TICKS} 0\n"
    )
    machine.stop()
    rows = {row.metric: row.value for row in machine.measurements()}
    assert rows["machine_user_seconds"] == pytest.approx(1.0)
    assert rows["machine_system_seconds"] == pytest.approx(1.0)
    assert rows["machine_softirq_seconds"] == pytest.approx(2.0)
    assert rows["machine_busy_seconds"] == pytest.approx(4.0)
    assert all(row.labels["process"] == "machine" for row in machine.measurements())


def test_sampler_with_machine_reads_proc_stat_for_real() -> None:
    with ResourceSampler({}, interval=0.05, machine=True) as sampler:
        time.sleep(0.1)
    rows = {row.metric: row.value for row in sampler.measurements()}
    assert rows["machine_idle_seconds"] + rows["machine_busy_seconds"] > 0.0
    assert "machine_softirq_seconds" in rows
