"""Each mode's usual walk, as ordered patterns a trace is compared against."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.trace.run import TraceResult


def differences(result: TraceResult) -> list[str]:
    return []
