"""Manifest roots of the tests' own, outside pytest's rotating tmp dirs, so that whatever a
failing test leaves is still named by a manifest and cleaned when the root is."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEST_RUNS = Path("/run/testbed-tests")


@contextlib.contextmanager
def own_runs_root() -> Iterator[Path]:
    """A fresh root for the duration; afterwards everything recorded under it is cleaned."""
    from testbed.netlab import clean_all

    root = TEST_RUNS / uuid.uuid4().hex[:12]
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        clean_all(root)
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last one out removes the shared folder
            TEST_RUNS.rmdir()
