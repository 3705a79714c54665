"""Experiments on real clusters (root): a small run end to end, and Ctrl-C in the middle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from testbed.experiment import ExperimentInterrupted, run_experiment
from testbed.redirect import available_modes
from testbed.results import COLUMNS, load

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_spec(
    folder: Path,
    modes: list[str],
    *,
    repetitions: int | str = 2,  # or "{auto: {...}}"
    placements: str = "[cross-node]",
    name: str = "it",
    extra: str = "",
    trace: bool = False,  # the walks have a test of their own; the rest stays quick
) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""
        name: {name}
        topology: two_nodes
        modes: [{", ".join(modes)}]
        workloads: [tcp_stream]
        placements: {placements}
        repetitions: {repetitions}
        warmup: 0
        duration: 1
        trace: {str(trace).lower()}
        """)
        + extra
    )
    return path


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}


def leaked_namespaces(run_dir: Path) -> set[str]:
    metadata = json.loads((run_dir / "metadata.json").read_text())
    runs = {mode["cluster_run"] for mode in metadata["modes"].values() if "cluster_run" in mode}
    assert runs, "metadata names no cluster run"
    return {name for name in namespaces() if any(name.startswith(f"tb-{r}-") for r in runs)}


def check_run(run_dir: Path, modes: list[str], repetitions: int) -> None:
    frame = load(run_dir)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert load(run_dir / "results.csv").shape == frame.shape
    throughput = frame[frame["metric"] == "throughput"]
    assert sorted(set(throughput["mode"])) == sorted(modes)
    assert len(throughput) == len(modes) * repetitions
    assert (throughput["value"] > 1e8).all()  # anything working moves > 100 Mbit/s here
    assert (throughput["status"] == "ok").all()
    assert list((run_dir / "raw").glob("*/iperf3-client.json"))
    assert not leaked_namespaces(run_dir)


def test_small_experiment_with_mode_none(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, ["none"])
    run_dir = run_experiment(
        spec, results_dir=tmp_path / "results", report=True, show_progress=False
    )
    check_run(run_dir, ["none"], 2)
    report = (run_dir / "report.md").read_text()
    assert "![throughput per mode](figures/throughput.png)" in report
    assert (run_dir / "figures" / "throughput.png").stat().st_size > 10_000


def test_small_experiment_with_two_modes(tmp_path: Path) -> None:
    modes = available_modes()[:2]
    if len(modes) < 2:
        pytest.skip(f"only {modes} available; two modes needed")
    spec = write_spec(tmp_path, modes)
    run_dir = run_experiment(
        spec, results_dir=tmp_path / "results", report=True, show_progress=False
    )
    check_run(run_dir, modes, 2)
    assert "ratio to none" in (run_dir / "report.md").read_text()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_shows_how_each_mode_moves_a_connection(tmp_path: Path) -> None:
    modes = ["none", "inpod"]
    if "inpod" not in available_modes():
        pytest.skip("mode inpod is not available on this machine")
    spec = write_spec(tmp_path, modes, repetitions=1, name="walks", trace=True)
    run_dir = run_experiment(
        spec, results_dir=tmp_path / "results", report=True, show_progress=False
    )
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## How each mode moves a connection") :]
    metadata = json.loads((run_dir / "metadata.json").read_text())
    for mode in modes:
        assert metadata["modes"][mode]["walk_notes"] == []
        for placement in ("same-node", "cross-node"):
            stem = f"walk-{mode}-{placement}"
            png = (run_dir / "figures" / f"{stem}.png").read_bytes()
            assert png.startswith(PNG_MAGIC) and len(png) > 1000
            svg = (run_dir / "figures" / f"{stem}.svg").read_text()
            assert "<svg" in svg
            walk = (run_dir / "walks" / f"{stem}.txt").read_text()
            assert f"mode {mode}, {placement}: connected" in walk
            assert section.count(f"#### {stem}\n") == 1
            assert f"![{stem}](figures/{stem}.png)" in section
    assert "15001" in (run_dir / "walks" / "walk-inpod-cross-node.txt").read_text()
    check_run(run_dir, modes, 1)  # the traces took nothing from the measured cases


def test_failing_case_is_recorded_and_the_rest_complete(tmp_path: Path) -> None:
    # iperf3 refuses more than 128 streams: a real tool failure, quick and harmless.
    spec = write_spec(tmp_path, ["none"], repetitions=1, extra="sweeps: {parallel: [200, 1]}\n")
    run_dir = run_experiment(spec, results_dir=tmp_path / "results", show_progress=False)
    cases = load(run_dir).drop_duplicates("case_id").set_index("case_id")
    failed = cases.loc["none-direct-cross-node-tcp_stream-p200-r1"]
    assert failed["status"] == "failed" and "iperf3" in failed["error"]
    assert cases.loc["none-direct-cross-node-tcp_stream-p1-r1", "status"] == "ok"
    assert not leaked_namespaces(run_dir)


def test_interrupted_run_keeps_partial_results_and_leaves_no_namespaces(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, ["none"], repetitions=20, name="sigint")
    results = tmp_path / "results"
    code = (
        "import sys\nfrom pathlib import Path\nfrom testbed.experiment import run_experiment\n"
        f"run_experiment(Path({str(spec)!r}), results_dir=Path({str(results)!r}), "
        "show_progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT)
    try:
        rows = wait_for_rows(results, process, timeout=60)
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0  # ended by the interrupt, not by finishing 20 cases
    run_dir = rows.parents[1]
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["status"] == "interrupted"
    frame = load(run_dir)
    measured = frame[frame["metric"] == "throughput"]
    assert 1 <= len(measured) < 20
    assert not leaked_namespaces(run_dir)


def wait_for_rows(results: Path, process: subprocess.Popen[bytes], timeout: float) -> Path:
    """The run's rows file once it holds a measured case."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        for rows in results.glob("*/raw/rows.jsonl"):
            if '"throughput"' in rows.read_text():
                return rows
        time.sleep(0.1)
    raise AssertionError("no case was measured in time")


def test_interrupt_is_reported_with_the_run_directory(tmp_path: Path) -> None:
    assert issubclass(ExperimentInterrupted, KeyboardInterrupt)
    error = ExperimentInterrupted(tmp_path)
    assert error.run_dir == tmp_path and str(tmp_path) in str(error)


def test_paths_of_two_modes_give_path_rows_and_the_breakdown(tmp_path: Path) -> None:
    spec = tmp_path / "paths.yaml"
    spec.write_text(
        textwrap.dedent("""
        name: paths
        topology: two_nodes
        modes: [none, inpod]
        paths: [direct, capture, hbone, waypoint]
        workloads: [tcp_rr, tcp_stream]
        placements: [cross-node]
        repetitions: 1
        warmup: 0
        duration: 1
        """)
    )
    started = time.monotonic()
    run_dir = run_experiment(
        spec, results_dir=tmp_path / "results", report=True, show_progress=False
    )
    assert time.monotonic() - started < 120
    frame = load(run_dir)
    assert "path" in frame.columns and frame["path"].notna().all()
    ok = frame[frame["status"] == "ok"]
    paths = {(mode, path) for mode, path in ok[["mode", "path"]].drop_duplicates().to_numpy()}
    assert paths == {("none", "direct"), ("inpod", "capture"), ("inpod", "hbone"),
                     ("inpod", "waypoint")}  # fmt: skip
    rtt = ok[ok["metric"] == "rtt_p50"].set_index("path")["value"]
    assert rtt["hbone"] > rtt["direct"]  # two proxies and mTLS cost something
    assert (ok["metric"] == "machine_softirq_seconds").any()
    assert (ok["metric"] == "cpu_system_seconds").any()
    report = (run_dir / "report.md").read_text()
    assert "## Where the time goes" in report
    assert "figures/breakdown_rr_p50.png" in report
    assert (run_dir / "figures" / "breakdown_rr_p50.png").stat().st_size > 10_000
    assert "Modes compared on capture alone" in report
    assert not leaked_namespaces(run_dir)


def test_auto_repetitions_judge_each_case_and_say_what_ended_it(tmp_path: Path) -> None:
    # cv 0.5: any working stream is steady at 3 repetitions; budget 1 s: no extra one
    auto = "{auto: {min: 3, max: 5, cv: 0.5, budget: 1s}}"
    spec = write_spec(tmp_path, ["none"], name="auto", repetitions=auto)
    run_dir = run_experiment(
        spec, results_dir=tmp_path / "results", report=True, show_progress=False
    )
    check_run(run_dir, ["none"], 3)
    throughput = load(run_dir).query("metric == 'throughput'")
    assert set(throughput["steadiness"]) == {"steady"}
    assert set(throughput["steadiness_stop"]) == {"steady"}
    series = json.loads((run_dir / "metadata.json").read_text())["steadiness"]["series"]
    assert series["none-direct-cross-node-tcp_stream-p1"]["n"] == 3
    assert "## Steadiness of the repetitions" in (run_dir / "report.md").read_text()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy (the native peer) missing")
def test_native_peer_gives_rows_beside_none(tmp_path: Path) -> None:
    placements = "[same-node, cross-node]"
    spec = write_spec(
        tmp_path, ["none"], name="native", placements=placements, extra="peers: [native]\n"
    )
    run_dir = run_experiment(
        spec, results_dir=tmp_path / "results", report=True, show_progress=False
    )
    check_run(run_dir, ["none", "native"], 2 * 2)  # two placements
    frame = load(run_dir)
    native = frame[frame["mode"] == "native"]
    assert set(native["path"]) == {"native"} and set(native["status"]) == {"ok"}
    assert set(native[native["metric"] == "throughput"]["placement"]) == {"same-node", "cross-node"}
    # HAProxy's two sides are sampled as the peer's proxies
    assert set(native[native["metric"] == "rss_max_bytes"]["process"]) == {
        "haproxy-client",
        "haproxy-server",
    }
    assert "ratio to native" in (run_dir / "report.md").read_text()
