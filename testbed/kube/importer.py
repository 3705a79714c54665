"""`testbed import ROWS.jsonl --name NAME`: an exported experiment's Job output as a normal
results directory (raw/rows.jsonl, results.parquet, results.csv, metadata.json with
`platform: kubernetes`), which `testbed report` and `testbed compare` read unchanged.

Lines that are not JSON objects (kubectl's own messages, a shell prompt) are skipped and
counted in the metadata; a JSON line that is not a row is an error naming its line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.experiment.runner import utc_now
from testbed.experiment.store import RunStore
from testbed.netlab.errors import TestbedError
from testbed.results import CASE_COLUMNS, MEASUREMENT_COLUMNS

REQUIRED = ("experiment", "mode", "placement", "workload", "repetition", "case_id", "status")
PLATFORM = "kubernetes"


class RowsError(TestbedError, ValueError):
    """Rows that are not the Job's rows, named by file and line."""


def read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RowsError(f"{path}: cannot be read: {exc.strerror}") from None
    rows, skipped = [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.lstrip().startswith("{"):
            skipped += bool(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RowsError(f"{path}:{number}: not a JSON row ({exc.msg})") from None
        missing = [key for key in REQUIRED if key not in row]
        if not isinstance(row, dict) or missing:
            raise RowsError(f"{path}:{number}: not a testbed row (missing {missing})")
        rows.append(row)
    if not rows:
        raise RowsError(f"{path}: no rows (expected JSON lines from `kubectl logs job/...`)")
    return rows, skipped


def import_rows(path: Path, name: str, results_dir: Path = Path("results")) -> Path:
    rows, skipped = read_rows(path)
    store = RunStore.create(results_dir, name)
    for row in rows:
        row["run_id"] = store.run_id
        row.setdefault("platform", PLATFORM)
    store.append_rows(rows)
    count = store.finalize()
    facts = sorted({k for row in rows for k in row} - set(CASE_COLUMNS) - set(MEASUREMENT_COLUMNS))
    cases = {row["case_id"] for row in rows}
    failed = {row["case_id"] for row in rows if row["status"] != "ok"}
    store.write_metadata(
        {
            "experiment": rows[0]["experiment"],
            "run_id": store.run_id,
            "platform": PLATFORM,
            "imported_from": str(path),
            "imported_at": utc_now(),
            "status": "complete",
            "rows": count,
            "skipped_lines": skipped,
            "cases_ok": len(cases - failed),
            "cases_failed": len(failed),
            "modes": {m: {"mode": m} for m in sorted({row["mode"] for row in rows})},
            "cluster": {f: sorted({str(row[f]) for row in rows if f in row}) for f in facts},
        }
    )
    return store.path
