"""Turning a case and its measurements into the tidy rows of testbed.results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from testbed.experiment.cases import Case
from testbed.experiment.workloads import MeasurementLike
from testbed.results import COLUMNS


def _merge_extra(row: dict[str, Any], extra: Mapping[str, Any], prefix: str) -> None:
    """Add facts or labels as string columns, never overwriting a documented column."""
    for key, value in extra.items():
        row[f"{prefix}{key}" if key in COLUMNS else key] = str(value)


def case_row(
    case: Case, context: Mapping[str, Any], facts: Mapping[str, Any], started_at: str
) -> dict[str, Any]:
    """The columns every row of a case shares; `context` holds experiment, run_id, ..."""
    row: dict[str, Any] = {**context, **case.parameters(), "case_id": case.case_id}
    row["started_at"] = started_at
    _merge_extra(row, facts, "fact_")
    return row


def measurement_rows(
    base: Mapping[str, Any], measured: Sequence[MeasurementLike]
) -> list[dict[str, Any]]:
    rows = []
    for item in measured:
        row = {**base, "metric": item.metric, "value": float(item.value), "unit": item.unit}
        row.update(status="ok", error="")
        _merge_extra(row, item.labels, "label_")
        rows.append(row)
    return rows


def failed_row(base: Mapping[str, Any], status: str, error: str) -> dict[str, Any]:
    return {**base, "metric": None, "value": None, "unit": None, "status": status, "error": error}
