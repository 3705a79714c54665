"""What measure needs from a place that runs commands: a pod, a node or a bare namespace.

Defined here as Protocols so that measure does not import cluster or netlab; netlab's
`Netns` and cluster's `Pod` satisfy `Host`, netlab's `ManagedProcess` satisfies `Process`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol


class Process(Protocol):
    """A long-running process started by `Host.spawn`."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self, timeout: float = 5.0) -> int | None: ...

    def output(self) -> str: ...


class Host(Protocol):
    """Runs short commands and spawns long-running ones, in its own network namespace."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 60.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]: ...

    def spawn(
        self,
        argv: Sequence[str],
        *,
        label: str,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Process: ...
