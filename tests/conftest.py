import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests need root (CI runs them as root)")
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(skip)


TEST_RUNS = Path("/run/testbed-tests")


@pytest.fixture
def runs_root() -> Iterator[Path]:
    """A manifest root of the test's own, outside pytest's rotating tmp dirs, so that
    whatever a failing test leaves is still named by a manifest and cleaned here."""
    from testbed.netlab import clean_all

    root = TEST_RUNS / uuid.uuid4().hex[:12]
    root.mkdir(parents=True)
    yield root
    clean_all(root)
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last test out removes the shared folder
        TEST_RUNS.rmdir()
