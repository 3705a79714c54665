"""testbed.results.load on a run whose CLI was killed: no results.csv, only its rows so far."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.results import COLUMNS, PARTIAL_ROWS, frame_from_rows, load


def row(case: str, value: float) -> dict[str, object]:
    return {"experiment": "crash", "case_id": case, "metric": "throughput", "value": value,
            "unit": "bit/s", "status": "ok", "repetition": 1}  # fmt: skip


def test_a_crashed_run_reads_its_rows_and_drops_a_line_cut_short(tmp_path: Path) -> None:
    rows = tmp_path / PARTIAL_ROWS
    rows.parent.mkdir(parents=True)
    lines = [json.dumps(row("c1", 1e9)), json.dumps(row("c2", 2e9)), '{"experiment": "cr']
    rows.write_text("\n".join(lines))
    frame = load(tmp_path)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert list(frame["case_id"]) == ["c1", "c2"] and frame["value"].sum() == 3e9


def test_finished_results_win_over_the_rows_and_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results at"):
        load(tmp_path)
    (tmp_path / PARTIAL_ROWS).parent.mkdir(parents=True)
    (tmp_path / PARTIAL_ROWS).write_text(json.dumps(row("c1", 1.0)) + "\n")
    frame_from_rows([row("c9", 9.0)]).to_csv(tmp_path / "results.csv", index=False)
    assert list(load(tmp_path)["case_id"]) == ["c9"]
