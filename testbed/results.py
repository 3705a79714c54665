"""Tidy experiment results: one row per measurement, every case parameter in its row.

Columns (in this order, then one column per cluster fact and measurement label):

    experiment, run_id    the spec's name; the run directory's name
    mode                  the mode's label in the spec (the mode name unless relabelled)
    path                  direct | capture | hbone | waypoint: how far into the mesh;
                          native for the native peer (its mode is "native" too)
    topology              as given to load_topology(), e.g. "two_nodes"
    placement             same-node | cross-node
    workload              tcp_stream | tcp_rr | tcp_crr | http_fixed_qps | http_crr
    msg_size, parallel, connections, qps, payload
                          the swept parameters (empty where a workload has no such axis)
    duration, warmup      seconds measured, seconds of warm-up before it
    repetition            1-based
    case_id               unique within a run; names the case's folder under raw/
    pinning               none | split
    metric, value, unit   one measurement (empty metric and value on a failed case)
    status, error         ok | failed | interrupted, and the error text of a failed case
    started_at            UTC time the case began, its warm-up first (ISO 8601)
    steadiness            the case's repetitions: steady | noisy | bimodal | unknown
                          (testbed.experiment.steadiness; the same on every repetition)
    steadiness_stop       what ended them: steady | max | budget (repetitions: auto),
                          fixed (a count), failed, interrupted

Cluster facts (testbed.cluster's Cluster.facts(), e.g. inpod_variant, tunnel) and
measurement labels (e.g. proxy) follow as extra string columns. A fact or label whose
name is one of the columns above is stored as fact_<name> or label_<name>.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

CASE_COLUMNS = (
    "experiment",
    "run_id",
    "mode",
    "path",
    "topology",
    "placement",
    "workload",
    "msg_size",
    "parallel",
    "connections",
    "qps",
    "payload",
    "duration",
    "warmup",
    "repetition",
    "case_id",
    "pinning",
)
MEASUREMENT_COLUMNS = ("metric", "value", "unit", "status", "error", "started_at")
SERIES_COLUMNS = ("steadiness", "steadiness_stop")
COLUMNS = CASE_COLUMNS + MEASUREMENT_COLUMNS + SERIES_COLUMNS
INTEGER_COLUMNS = ("msg_size", "parallel", "connections", "qps", "payload", "repetition")
FLOAT_COLUMNS = ("duration", "warmup", "value")
PARQUET_NAME = "results.parquet"
CSV_NAME = "results.csv"
PARTIAL_ROWS = Path("raw") / "rows.jsonl"  # appended as each case ends (experiment.store)


def frame_from_rows(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The documented column order and types, whatever the rows' key order."""
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    extra = sorted(column for column in frame.columns if column not in COLUMNS)
    frame = frame[[*COLUMNS, *extra]]
    return _with_types(frame)


def _with_types(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in INTEGER_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in frame.columns:
        if column not in INTEGER_COLUMNS and column not in FLOAT_COLUMNS:
            frame[column] = frame[column].astype("string")
    return frame


def load(path: str | Path) -> pd.DataFrame:
    """Results of a run: a run directory, or its results.parquet / results.csv. A run that
    never finished (the CLI was killed) has neither: its rows so far are read instead."""
    path = Path(path)
    if path.is_dir():
        parquet, csv, partial = path / PARQUET_NAME, path / CSV_NAME, path / PARTIAL_ROWS
        if not parquet.exists() and not csv.exists() and partial.exists():
            return frame_from_rows(_read_rows(partial))
        path = parquet if parquet.exists() else csv
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    if path.suffix == ".csv":
        return _with_types(pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""]))
    return _with_types(pd.read_parquet(path))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """JSON lines; a last line cut short by a crash is not a row."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows
