"""Keeping tools' raw output next to the parsed rows, for later inspection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.measure.errors import MeasureError


def save_raw(raw_dir: Path | None, name: str, text: str) -> Path | None:
    """Write `text` to `raw_dir/name`, or to `stem-2.ext`, `stem-3.ext`... if that exists,
    so that repetitions into the same directory never overwrite each other."""
    if raw_dir is None:
        return None
    raw_dir.mkdir(parents=True, exist_ok=True)
    first = raw_dir / name
    path, number = first, 1
    while path.exists():
        number += 1
        path = first.with_name(f"{first.stem}-{number}{first.suffix}")
    path.write_text(text)
    return path


def last_json_line(text: str, tool: str) -> dict[str, Any]:
    """The JSON object a tool prints as its last line (log lines may come before it)."""
    lines = text.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        raise MeasureError(f"{tool} printed no JSON report: {text[-300:]!r}")
    return report
