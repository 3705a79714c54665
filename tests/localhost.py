"""The measure Host protocol on this machine itself: commands run directly, without a
namespace (loopback traffic only). For tests of the run_* functions and the workloads."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


class LocalProcess:
    """A minimal stand-in for netlab's ManagedProcess: own process group, output to a file."""

    def __init__(self, argv: Sequence[str], label: str, env: dict[str, str] | None) -> None:
        self.label = label
        self.log = tempfile.NamedTemporaryFile(prefix=f"tbt-{label}-", suffix=".log")  # noqa: SIM115
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def terminate(self, timeout: float = 5.0) -> int | None:
        if self.popen.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
        return self.popen.wait()

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


class LocalHost:
    """`name`, when given, is what a Pod's name is to the run_* functions that use one."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.spawned: list[LocalProcess] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 60.0,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=check, input=input
        )

    def spawn(
        self,
        argv: Sequence[str],
        *,
        label: str,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> LocalProcess:
        process = LocalProcess(argv, label, env)
        self.spawned.append(process)
        return process

    def close(self) -> None:
        """Stop what is still running and drop the logs."""
        for process in self.spawned:
            process.terminate(timeout=2.0)
            process.log.close()
