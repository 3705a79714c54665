import os
import sys
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


@pytest.fixture
def runs_root() -> Iterator[Path]:
    """A manifest root of the test's own (`testruns.own_runs_root`)."""
    from testruns import own_runs_root

    with own_runs_root() as root:
        yield root
