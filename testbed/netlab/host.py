"""The one way to run a command in a namespace, as a type: what Netns does, stated once.

`Netns.run` / `Netns.spawn` are the implementation (nsenter into the namespace's path);
every other place that runs commands (a pod, a pinned workload) takes the same keyword
options, stated once here as `RunOptions` / `SpawnOptions`, and passes them on. Code that
only needs "somewhere to run commands" (rule installers, measurement tools) asks for
`CommandRunner` or `Host` rather than a concrete class.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol, TypedDict

from typing_extensions import Unpack

DEFAULT_TIMEOUT = 60.0


class RunOptions(TypedDict, total=False):
    """The keyword options of `run`; Netns.run gives the defaults (timeout DEFAULT_TIMEOUT,
    check True, no input)."""

    timeout: float | None
    check: bool
    input: str | None


class SpawnOptions(TypedDict, total=False):
    """The keyword options of `spawn` besides its label (no env override, no fds passed)."""

    env: dict[str, str] | None
    pass_fds: Sequence[int]


class Process(Protocol):
    """A long-running process started by `Host.spawn` (netlab's ManagedProcess fits)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self, timeout: float = 5.0) -> int | None: ...

    def output(self) -> str: ...


class CommandRunner(Protocol):
    """Runs a short command to completion inside its network namespace."""

    def run(
        self, argv: Sequence[str], **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]: ...


class Host(CommandRunner, Protocol):
    """Also starts long-running processes there, logged and recorded for teardown."""

    def spawn(
        self, argv: Sequence[str], *, label: str, **options: Unpack[SpawnOptions]
    ) -> Process: ...
