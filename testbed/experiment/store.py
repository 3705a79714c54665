"""The results store: results/<UTC-time>-<experiment>/ with raw/, rows and metadata.

Rows are appended to raw/rows.jsonl as each case ends, so an interrupted or crashed run
keeps what it measured; finalize() turns them into results.parquet and results.csv.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.results import CSV_NAME, PARQUET_NAME, frame_from_rows

RUN_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
ROWS_NAME = "rows.jsonl"
METADATA_NAME = "metadata.json"
SPEC_COPY_NAME = "spec.yaml"


class RunStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw_dir = path / "raw"

    @classmethod
    def create(cls, results_dir: Path, experiment: str, now: datetime | None = None) -> RunStore:
        stamp = (now or datetime.now(UTC)).strftime(RUN_TIME_FORMAT)
        path = results_dir / f"{stamp}-{experiment}"
        suffix = 1
        while path.exists():  # two runs within one second
            suffix += 1
            path = results_dir / f"{stamp}-{experiment}-{suffix}"
        (path / "raw").mkdir(parents=True)
        return cls(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def rows_path(self) -> Path:
        return self.raw_dir / ROWS_NAME

    def case_dir(self, case_id: str) -> Path:
        folder = self.raw_dir / case_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def append_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        with self.rows_path.open("a") as out:
            for row in rows:
                out.write(json.dumps(row, default=str) + "\n")

    def read_rows(self) -> list[dict[str, Any]]:
        if not self.rows_path.exists():
            return []
        return [json.loads(line) for line in self.rows_path.read_text().splitlines() if line]

    def write_metadata(self, metadata: Mapping[str, Any]) -> None:
        text = json.dumps(metadata, indent=2, sort_keys=True, default=str)
        (self.path / METADATA_NAME).write_text(text + "\n")

    def read_metadata(self) -> dict[str, Any]:
        path = self.path / METADATA_NAME
        return json.loads(path.read_text()) if path.exists() else {}

    def save_spec(self, spec_path: Path) -> None:
        (self.path / SPEC_COPY_NAME).write_text(spec_path.read_text())

    def finalize(self, columns: Mapping[str, Mapping[str, str]] | None = None) -> int:
        """Write results.parquet and results.csv from the rows so far; returns the row count.

        `columns`: case_id -> columns known only once a case's series has ended (its
        steadiness), added to each row of that case."""
        found = columns or {}
        rows = [{**row, **found.get(str(row.get("case_id")), {})} for row in self.read_rows()]
        frame = frame_from_rows(rows)
        frame.to_parquet(self.path / PARQUET_NAME, index=False)
        frame.to_csv(self.path / CSV_NAME, index=False)
        return len(frame)
