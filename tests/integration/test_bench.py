"""`testbed bench --quick` for real: two clusters and HAProxy; asserts only that every figure
of every arm was produced (numbers come from benchmarks, not tests)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from testbed.bench import QUICK, BenchOptions, run_bench
from testbed.bench.figures import expected_figures, missing_figures


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy (the native peer) missing")
def test_quick_bench_produces_every_figure(runs_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    options = BenchOptions(reps=2, durations=QUICK, out=tmp_path, root=runs_root, name_prefix="tb")
    samples = run_bench(options, say=lines.append)
    arms = ["none", "inpod", "native"]
    assert missing_figures(samples, arms) == []
    with (tmp_path / "rows.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = sum(len(expected_figures(arm)) for arm in arms) * 2
    assert len(rows) == expected
    assert {row["pinning"] for row in rows} == {"none"}
    assert any(line.startswith("pinning:") for line in lines)
    assert (tmp_path / "summary.csv").read_text().count("\n") == expected // 2 + 1
