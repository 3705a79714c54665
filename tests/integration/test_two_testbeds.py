"""Issue 16 item 5: two testbeds running experiments at once, and a crash of the CLI.

test_cli.py covers a crashed `up` and `clean` of a plain cluster, test_experiment_run.py a
Ctrl-C'd experiment in the same process; here it is `testbed run` processes as a user
starts them: two at once (different spec names and results dirs, one manifest root), where
`testbed clean NAME` of one leaves the other running to complete results; and one killed
with SIGKILL in the middle of a case, whose partial results stay readable
(`testbed.results.load`, `testbed report`) and whose testbed `testbed clean` removes.

The runner names its clusters itself; each test finds its runs' names as they appear in its
own manifest root (TESTBED_RUN_ROOT for `testbed run`, `--root` for the other commands).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from hoststate import netns_of_run

from testbed.netlab import RunManifest
from testbed.netlab.nsutil import netns_path
from testbed.netlab.reap import opened_netns, pids_in
from testbed.results import load

TESTBED = [sys.executable, "-m", "testbed.cli"]
PROJECT_ROOT = Path(__file__).resolve().parents[2]
KEEPER_CASES = 15  # 1 s each: the keeper is still measuring when the other is cleaned


def write_spec(folder: Path, name: str, mode: str, repetitions: int) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""
        name: {name}
        topology: two_nodes
        modes: [{mode}]
        workloads: [tcp_stream]
        placements: [cross-node]
        repetitions: {repetitions}
        warmup: 0
        duration: 1
        trace: false
        """)
    )
    return path


def start_run(spec: Path, results: Path, root: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TESTBED_RUN_ROOT": str(root)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*TESTBED, "run", str(spec), "--results", str(results)],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*TESTBED, "--root", str(root), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)


def new_run(root: Path, known: set[str], process: subprocess.Popen[bytes]) -> str:
    """The testbed the `testbed run` process builds: the manifest that appears in `root`."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it built its testbed"
        found = {p.name for p in root.iterdir() if (p / "manifest.jsonl").exists()} - known
        if found:
            assert len(found) == 1, found
            return found.pop()
        time.sleep(0.1)
    raise AssertionError("no testbed appeared")


def run_dir(results: Path) -> Path:
    (found,) = [p for p in results.iterdir() if p.is_dir()]
    return found


def measured(results: Path) -> int:
    rows = list(results.glob("*/raw/rows.jsonl"))
    return rows[0].read_text().count('"throughput"') if rows else 0


def wait_until(
    predicate: Callable[[], bool],
    process: subprocess.Popen[bytes],
    what: str,
    timeout: float = 120,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def finish(process: subprocess.Popen[bytes], timeout: float = 240) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_two_experiments_at_once_keep_their_results_and_clean_only_their_own(
    runs_root: Path, tmp_path: Path
) -> None:
    keeper_spec = write_spec(tmp_path, "chaos-keep", "inpod", repetitions=KEEPER_CASES)
    victim_spec = write_spec(tmp_path, "chaos-victim", "none", repetitions=60)
    keeper_results, victim_results = tmp_path / "results-keep", tmp_path / "results-victim"
    victim = start_run(victim_spec, victim_results, runs_root, tmp_path / "victim.log")
    keeper = None
    try:
        victim_run = new_run(runs_root, set(), victim)
        keeper = start_run(keeper_spec, keeper_results, runs_root, tmp_path / "keep.log")
        keeper_run = new_run(runs_root, {victim_run}, keeper)
        wait_until(lambda: measured(keeper_results) >= 1, keeper, "the keeper measured a case")
        assert measured(victim_results) >= 1
        keeper_namespaces = netns_of_run(keeper_run)
        assert keeper_namespaces and netns_of_run(victim_run)

        done = cli(runs_root, "clean", victim_run)
        assert done.returncode == 0, done.stderr
        assert netns_of_run(victim_run) == [] and not (runs_root / victim_run).exists()
        assert keeper.poll() is None, "the keeper finished before the clean: make it longer"
        assert netns_of_run(keeper_run) == keeper_namespaces  # the other one untouched
        assert (runs_root / keeper_run / "manifest.jsonl").exists()
        assert measured(keeper_results) < KEEPER_CASES

        assert finish(keeper) == 0, (tmp_path / "keep.log").read_text()[-2000:]
        finish(victim)  # its testbed is gone: its remaining cases fail, and it ends
    finally:
        for process in (keeper, victim):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    kept = load(run_dir(keeper_results))
    assert set(kept["experiment"]) == {"chaos-keep"}
    throughput = kept[kept["metric"] == "throughput"]
    assert len(throughput) == KEEPER_CASES and (throughput["status"] == "ok").all()
    assert (throughput["value"] > 1e7).all()
    victim_frame = load(run_dir(victim_results))
    assert set(victim_frame["experiment"]) == {"chaos-victim"}
    cases = victim_frame.drop_duplicates("case_id")
    assert (cases["status"] == "ok").sum() >= 1  # measured before its testbed was cleaned
    assert (cases["status"] != "ok").sum() >= 1  # and not after
    assert netns_of_run(keeper_run) == [] and netns_of_run(victim_run) == []
    assert list(runs_root.iterdir()) == []  # both manifests gone


def test_a_killed_cli_keeps_partial_results_readable_and_clean_removes_the_rest(
    runs_root: Path, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "chaos-crash", "inpod", repetitions=30)
    results = tmp_path / "results"
    process = start_run(spec, results, runs_root, tmp_path / "crash.log")
    try:
        name = new_run(runs_root, set(), process)
        wait_until(lambda: measured(results) >= 1, process, "a measured case")
        raw = run_dir(results) / "raw"

        def mid_case() -> bool:  # a case's folder exists, its row does not yet
            rows = (raw / "rows.jsonl").read_text()
            return any(f'"{d.name}"' not in rows for d in raw.iterdir() if d.is_dir())

        wait_until(mid_case, process, "the next case started")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    run = run_dir(results)
    assert not (run / "results.csv").exists()  # nothing was finalized
    frame = load(run)
    throughput = frame[frame["metric"] == "throughput"]
    assert 1 <= len(throughput) < 30 and (throughput["status"] == "ok").all()
    report = cli(runs_root, "report", str(run))
    assert report.returncode == 0, report.stderr
    text = (run / "report.md").read_text()
    assert "# Experiment chaos-crash" in text and "status: running" in text  # never finished

    manifest = RunManifest.open(name, runs_root)
    paths = [netns_path(e["name"]) for e in manifest.entries() if e.kind == "netns"]
    with opened_netns(paths) as owned:
        assert len(owned) == len(paths) > 0  # the crash left the testbed behind
        assert pids_in(owned), "the proxies and servers of the testbed outlived the CLI"
        done = cli(runs_root, "clean", name)
        assert done.returncode == 0, done.stderr
        assert pids_in(owned) == {}, "a process outlived `testbed clean` in its namespace"
    assert netns_of_run(name) == [] and not (runs_root / name).exists()
    assert load(run).shape == frame.shape  # clean leaves the results alone
