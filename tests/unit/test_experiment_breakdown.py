"""Where the time goes: the breakdown, the capture-alone intervals, published figures,
the runner's path switching and the exports, on made-up rows and fake clusters."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_experiment_fakes import (
    FAKE_WORKLOADS,
    FakeClusterFactory,
    FakePaths,
    fake_runner,
    load_fake_spec,
)

from testbed.experiment import breakdown
from testbed.experiment.analysis import label_paths, with_paths
from testbed.experiment.cases import Case
from testbed.experiment.export import ExportError, export_run, fortio_result
from testbed.experiment.progress import RunProgress
from testbed.experiment.published import iperf_comparisons
from testbed.experiment.report import write_report
from testbed.experiment.run import execute
from testbed.experiment.store import RunStore
from testbed.measure.rows import Measurement
from testbed.results import frame_from_rows

# RR p50 per path (us) and per-repetition wobble; none ran direct only.
RR = {
    ("none", "direct"): 30.0,
    ("inpod", "capture"): 45.0,
    ("inpod", "hbone"): 120.0,
    ("inpod", "waypoint"): 200.0,
    ("legacy", "capture"): 70.0,
    ("legacy", "hbone"): 130.0,
}


def rr_rows() -> pd.DataFrame:
    rows = []
    for (mode, path), value in RR.items():
        for repetition in (1, 2, 3):
            rows.append(
                {
                    "mode": mode,
                    "path": path,
                    "placement": "cross-node",
                    "workload": "tcp_rr",
                    "msg_size": 64,
                    "repetition": repetition,
                    "case_id": f"{mode}-{path}-{repetition}",
                    "metric": "rtt_p50",
                    "value": value + repetition - 2,
                    "unit": "us",
                    "status": "ok",
                }
            )
    return frame_from_rows(rows)


def test_breakdown_steps_add_up_to_each_path() -> None:
    table = breakdown.breakdown_table(rr_rows(), breakdown.FIGURE_BY_NAME["rr_p50"])
    inpod = table[table["mode"] == "inpod"].iloc[0]
    assert inpod["direct"] == 30.0
    assert inpod["+capture"] == 15.0 and inpod["+HBONE"] == 75.0 and inpod["+waypoint"] == 80.0
    assert inpod["total"] == 200.0 and inpod["dominant"] == "+waypoint"
    legacy = table[table["mode"] == "legacy"].iloc[0]
    assert np.isnan(legacy["+waypoint"]) and legacy["dominant"] == "+HBONE"


def test_dominant_sentence_names_the_layer() -> None:
    figure = breakdown.FIGURE_BY_NAME["rr_p50"]
    table = breakdown.breakdown_table(rr_rows(), figure)
    sentence = breakdown.dominant_sentence("legacy", table, figure)
    assert sentence.startswith("legacy: +HBONE dominates") and "+60 us of 130" in sentence


def test_capture_alone_costs_with_intervals_that_contain_them() -> None:
    costs = breakdown.capture_costs(rr_rows(), breakdown.FIGURE_BY_NAME["rr_p50"])
    by_mode = costs.set_index("mode")
    assert by_mode.loc["inpod", "cost"] == pytest.approx(15.0)
    assert by_mode.loc["legacy", "cost"] == pytest.approx(40.0)
    for _, row in costs.iterrows():
        assert row["low"] <= row["cost"] <= row["high"]


def test_bootstrap_interval_is_reproducible_and_narrows_with_agreement() -> None:
    wide = breakdown.bootstrap_difference(np.array([10.0, 20, 30]), np.array([0.0, 1, 2]))
    assert wide == breakdown.bootstrap_difference(np.array([10.0, 20, 30]), np.array([0.0, 1, 2]))
    narrow = breakdown.bootstrap_difference(np.array([20.0, 20, 20]), np.array([1.0, 1, 1]))
    assert narrow == (19.0, 19.0, 19.0)
    assert wide[1] < 19.0 < wide[2]


def test_runs_without_paths_read_as_direct_and_hbone() -> None:
    frame = rr_rows().drop(columns=["path"])
    assert set(with_paths(frame)["path"]) == {"direct", "hbone"}
    labelled = label_paths(rr_rows())
    assert {"none", "inpod", "inpod capture", "inpod waypoint"} <= set(labelled["mode"])


def test_cpu_per_gb_is_cpu_over_bytes_moved() -> None:
    rows = []
    for mode, path, cpu in (("none", "direct", 50.0), ("inpod", "capture", 80.0)):
        base = {"mode": mode, "path": path, "placement": "cross-node", "workload": "tcp_stream",
                "parallel": 1, "repetition": 1, "case_id": mode, "status": "ok"}  # fmt: skip
        rows.append({**base, "metric": "throughput", "value": 8e9, "unit": "bit/s"})
        rows.append({**base, "metric": "machine_busy_percent", "value": cpu, "unit": "percent"})
    figure = breakdown.FIGURE_BY_NAME["cpu_per_gb"]
    values = breakdown.figure_values(frame_from_rows(rows), figure).set_index("mode")["value"]
    assert values["none"] == pytest.approx(0.5)  # half a CPU for 1 GB/s
    assert values["inpod"] == pytest.approx(0.8)


def test_published_iperf_ratios_beside_ours() -> None:
    rows = []
    for mode, path, bits in (("none", "direct", 10e9), ("inpod", "hbone", 5e9)):
        case = {"mode": mode, "path": path, "placement": "cross-node", "workload": "tcp_stream"}
        rows.append({**case, "parallel": 1, "repetition": 1, "case_id": mode, "status": "ok",
                     "metric": "throughput", "value": bits, "unit": "bit/s"})  # fmt: skip
    found = {c.key: c for c in iperf_comparisons(frame_from_rows(rows))}
    assert found["iperf_ambient"].measured_ratio == pytest.approx(0.5)
    assert found["iperf_ambient"].published_ratio == pytest.approx(12.21 / 13.19)


PATH_SPEC = """
name: paths
topology: two_nodes
modes: [none, inpod]
paths: [direct, capture, hbone, waypoint]
workloads: [tcp_rr, http_fixed_qps]
placements: [same-node, cross-node]
repetitions: 2
warmup: 0
duration: 1
sample_interval: 0.05
"""


def seen_ip_rr(client: Any, server: Any, case: Case, raw_dir: Path | None) -> list[Measurement]:
    rows = FAKE_WORKLOADS["tcp_rr"](client, server, case, raw_dir)
    return [*rows, Measurement("target", 1.0, "count", {"target_ip": server.ip})]


def test_runner_switches_path_once_per_path_and_repetition(tmp_path: Path) -> None:
    spec_path, spec = load_fake_spec(tmp_path, PATH_SPEC)
    store = RunStore.create(tmp_path / "results", spec.name)
    paths = FakePaths()
    factory = FakeClusterFactory()
    workloads = {**FAKE_WORKLOADS, "tcp_rr": seen_ip_rr}
    execute(spec_path, spec, store, fake_runner(spec, store, factory, workloads, paths))
    switches = [path for path, _ in paths.switches]
    assert switches == ["direct", *["capture", "hbone", "waypoint"] * 2]
    assert all(servers == ["node1", "node2"] for _, servers in paths.switches)
    assert [c.topology for c in factory.clusters] == ["two_nodes", "two_nodes+waypoint"]
    frame = pd.read_parquet(store.path / "results.parquet")
    targets = frame[frame["metric"] == "target"].groupby("path")["target_ip"].agg(set)
    assert targets["waypoint"] == {"10.96.0.99"} and "10.96.0.99" not in targets["hbone"]
    assert set(frame["path"]) == {"direct", "capture", "hbone", "waypoint"}
    assert (frame[frame["mode"] == "inpod"]["topology_variant"] == "+waypoint").all()


def test_report_and_exports_of_a_run_with_paths(tmp_path: Path) -> None:
    spec_path, spec = load_fake_spec(tmp_path, PATH_SPEC)
    store = RunStore.create(tmp_path / "results", spec.name)
    execute(spec_path, spec, store, fake_runner(spec, store, FakeClusterFactory()))
    text = write_report(store.path).read_text()
    assert "## Where the time goes" in text and "breakdown_rr_p50.png" in text
    assert "| inpod | same-node |" in text
    with pytest.raises(ExportError, match="no HTTP cases"):
        export_run(store.path, "fortio")  # the fake HTTP workload keeps no raw report
    smp = json.loads(export_run(store.path, "smp")[0].read_text())
    result = smp[0]["performance_test_result"]
    assert result["smp_version"] and result["latencies_ms"]["p90"] > 0
    assert result["labels"]["path"] in ("direct", "capture", "hbone", "waypoint")
    roles = {key for doc in smp for key in doc["service_mesh_config"]}
    assert "ztunnel" in roles  # our extra role, with CPU and memory SMP results lack
    with pytest.raises(ExportError, match="expected one of"):
        export_run(store.path, "csv")


def test_fortio_result_has_fortio_field_names() -> None:
    report = {
        "url": "http://10.0.0.1:8080/echo", "target_qps": 1000.0, "connections": 4,
        "duration_s": 2.0, "window_s": 2.0, "achieved_qps": 998.0, "responses": 1996,
        "errors": {"status_503": 4, "timeout": 2}, "new_connection": False,
        "latency_us": {"count": 1996, "mean": 300.0, "min": 100, "max": 900, "p50": 250,
                       "p90": 500, "p99": 800, "p99.9": 900},
        "histogram_us": [[200, 500], [500, 1300], [1000, 196]],
    }  # fmt: skip
    result = fortio_result(report, "run case", "2026-12-01T00:00:00+00:00")
    assert result["RunType"] == "HTTP" and result["ActualQPS"] == 998.0
    assert result["RetCodes"] == {"200": 1992, "503": 4, "-1": 2}
    assert result["ActualDuration"] == 2_000_000_000 and result["NumThreads"] == 4
    histogram = result["DurationHistogram"]
    assert histogram["Count"] == 1996 and histogram["Avg"] == pytest.approx(300e-6)
    assert {"Percentile": 90.0, "Value": 500e-6} in histogram["Percentiles"]
    assert histogram["Data"][-1]["Percent"] == pytest.approx(100.0)
    second = histogram["Data"][1]
    assert (second["Start"], second["End"], second["Count"]) == (200e-6, 500e-6, 1300)
    assert second["Percent"] == pytest.approx(1800 / 19.96)


def test_progress_writes_a_line_per_case_off_a_terminal() -> None:
    stream = io.StringIO()
    with RunProgress(10.0, 2, stream=stream) as progress:
        progress.advance(2.0, cases=0)  # a cluster build: no line
        progress.describe("inpod capture cross-node tcp_rr msg_size=64 rep 1")
        progress.advance(4.0, cases=1, status="ok")
        progress.describe("inpod hbone cross-node tcp_rr msg_size=64 rep 1")
        progress.advance(4.0, cases=1, status="failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/2 ")
    assert lines[0].endswith("inpod capture cross-node tcp_rr msg_size=64 rep 1: ok")
    assert lines[1].startswith("[2/2 ") and lines[1].endswith(": failed")


def test_export_results_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from testbed.cli import main

    assert main(["export-results", str(tmp_path), "--format", "smp"]) == 2
    assert "not a results directory" in capsys.readouterr().err
    spec_path, spec = load_fake_spec(tmp_path, PATH_SPEC)
    store = RunStore.create(tmp_path / "results", spec.name)
    execute(spec_path, spec, store, fake_runner(spec, store, FakeClusterFactory()))
    out = tmp_path / "smp-out"
    assert main(["export-results", str(store.path), "--format", "smp", "--out", str(out)]) == 0
    assert json.loads((out / "smp.json").read_text())
