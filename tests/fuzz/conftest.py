"""Hypothesis profiles for the fuzz targets (see fuzz_support.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

from fuzz_support import inputs_tried, write_summary

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    database=None,
    deadline=None,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100000")),
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not inputs_tried:
        return
    write_summary()
    terminalreporter.write_sep("-", "fuzz inputs tried per target")
    for target, count in sorted(inputs_tried.items()):
        terminalreporter.write_line(f"{target:24} {count:>9,}")
