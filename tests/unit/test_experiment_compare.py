from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from testbed.experiment.compare import (
    compare_runs,
    exact_p_value,
    mann_whitney_u,
    ranges_separate,
)
from testbed.results import frame_from_rows


def write_run(folder: Path, values: dict[tuple[str, str], list[float]]) -> Path:
    """A run directory holding results.parquet with (mode, metric) -> one value per repetition."""
    rows = [
        {
            "experiment": "x",
            "run_id": folder.name,
            "mode": mode,
            "placement": "same-node",
            "workload": "tcp_stream",
            "parallel": 1,
            "repetition": index + 1,
            "metric": metric,
            "value": value,
            "unit": "bit/s" if metric == "throughput" else "us",
            "status": "ok",
        }
        for (mode, metric), repetitions in values.items()
        for index, value in enumerate(repetitions)
    ]
    folder.mkdir(parents=True)
    frame_from_rows(rows).to_parquet(folder / "results.parquet")
    return folder


def test_mann_whitney_u_counts_pairs_and_half_ties() -> None:
    assert mann_whitney_u([3, 4], [1, 2]) == 4
    assert mann_whitney_u([1, 2], [3, 4]) == 0
    assert mann_whitney_u([2], [2]) == 0.5


def test_exact_p_value_of_complete_separation() -> None:
    assert exact_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    assert exact_p_value([1, 2], [3, 4]) == pytest.approx(2 / 6)
    interleaved = exact_p_value([1, 3, 5], [2, 4, 6])
    assert interleaved is not None and interleaved > 0.5


def test_ranges_separate_only_without_overlap() -> None:
    assert ranges_separate([1, 2, 3], [3.5, 4, 5])
    assert ranges_separate([5, 6], [1, 2])
    assert not ranges_separate([1, 2, 4], [3, 5, 6])


def test_compare_lists_changes_beyond_noise_only(tmp_path: Path) -> None:
    a = write_run(
        tmp_path / "a",
        {
            ("none", "throughput"): [10.0e9, 10.2e9, 9.9e9],
            ("inpod", "throughput"): [5.0e9, 5.3e9, 5.1e9],
            ("inpod", "rtt_p50"): [100.0, 104.0, 98.0],
        },
    )
    b = write_run(
        tmp_path / "b",
        {
            ("none", "throughput"): [10.1e9, 9.8e9, 10.3e9],  # overlaps: noise
            ("inpod", "throughput"): [6.0e9, 6.2e9, 6.1e9],  # all above: a change
            ("inpod", "rtt_p50"): [105.0, 106.0, 105.5],  # all above 104: a change
        },
    )
    text = compare_runs(a, b)
    assert "Compared 3 (case, metric) pairs" in text
    lines = [line for line in text.splitlines() if line.startswith(("none", "inpod"))]
    assert len(lines) == 2
    assert lines[0].startswith("inpod") and "throughput" in lines[0] and "+19.6%" in lines[0]
    assert "rtt_p50" in lines[1] and "+5.5%" in lines[1] and "0.1" in lines[1]


def test_compare_of_a_run_with_itself_finds_nothing(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", {("none", "throughput"): [1.0, 2.0, 3.0]})
    assert compare_runs(a, a).endswith("No change beyond run-to-run noise.")


def test_single_repetitions_are_not_compared(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", {("none", "throughput"): [1.0]})
    b = write_run(tmp_path / "b", {("none", "throughput"): [2.0]})
    text = compare_runs(a, b)
    assert "Compared 0 (case, metric) pairs" in text and "No change" in text


def test_compare_marks_a_change_whose_repetitions_were_not_steady(tmp_path: Path) -> None:
    runs = []
    for name, values, flag in (
        ("a", [5.0e9, 5.1e9, 5.05e9, 5.02e9], "steady"),
        ("b", [6.0e9, 8.0e9, 6.1e9, 8.1e9], "bimodal"),
    ):
        folder = write_run(tmp_path / name, {("inpod", "throughput"): values})
        frame = pd.read_parquet(folder / "results.parquet")
        frame["steadiness"], frame["steadiness_stop"] = flag, "fixed"
        frame.to_parquet(folder / "results.parquet")
        runs.append(folder)
    text = compare_runs(*runs)
    assert "A: a (0 of 1 cases not steady)" in text and "B: b (1 of 1 cases not steady)" in text
    (line,) = [line for line in text.splitlines() if line.startswith("inpod")]
    assert line.endswith("B bimodal")


def test_compare_of_runs_without_steadiness_says_so(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", {("none", "throughput"): [1.0, 2.0, 3.0]})
    assert "A: a (steadiness not recorded)" in compare_runs(a, a)
