"""Named network namespaces and what can be done inside one."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute

from testbed.netlab import nsutil
from testbed.netlab.host import DEFAULT_TIMEOUT
from testbed.netlab.process import ManagedProcess, run_command, start_process

SpawnHook = Callable[[str, Sequence[str]], Path]
"""Called before a process starts (label, argv) -> log path; records it in a manifest."""


class Netns:
    """A network namespace at /run/netns/<name>."""

    def __init__(
        self,
        name: str,
        *,
        on_spawn: SpawnHook | None = None,
        on_started: Callable[[ManagedProcess], None] | None = None,
    ) -> None:
        self.name = name
        self.path = nsutil.netns_path(name)
        self._on_spawn = on_spawn
        self._on_started = on_started

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_command(self.path, argv, timeout=timeout, check=check, input=input)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        label: str,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> ManagedProcess:
        if self._on_spawn is None:
            raise RuntimeError(f"{self.name}: spawning needs a Lab that records processes")
        log = self._on_spawn(label, argv)
        proc = start_process(self.path, argv, label=label, log=log, env=env, pass_fds=pass_fds)
        if self._on_started is not None:
            self._on_started(proc)
        return proc

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread is inside this namespace for the body (sockets stay here)."""
        with nsutil.entered(self.path):
            yield

    @contextmanager
    def iproute(self) -> Iterator[IPRoute]:
        """A netlink (rtnetlink) socket bound to this namespace."""
        with self.entered():
            ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def set_sysctl(self, key: str, value: str | int) -> None:
        """Write a net.* sysctl of this namespace (never the host's)."""
        if not key.startswith("net."):
            raise ValueError(f"only per-namespace net.* sysctls can be set, not {key}")
        path = "/proc/sys/" + key.replace(".", "/")
        with self.entered(), open(path, "w", encoding="ascii") as out:
            out.write(str(value))

    def get_sysctl(self, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        with self.entered(), open(path, encoding="ascii") as src:
            return src.read().strip()
