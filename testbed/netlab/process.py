"""Processes started inside network namespaces, identified safely across restarts.

A process is named in the manifest by pid *and* its kernel start time, so cleanup after a
crash never signals a process that merely reused the pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.netlab.errors import TestbedError


class NetlabError(TestbedError):
    """A netlab operation failed; the message says which and why."""


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of `pid`, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[19])


def is_same_process(pid: int, start_time: int) -> bool:
    return process_start_time(pid) == start_time


def nsenter_argv(netns_path: str | None, argv: Sequence[str]) -> list[str]:
    if netns_path is None:
        return list(argv)
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def run_command(
    netns_path: str | None,
    argv: Sequence[str],
    *,
    timeout: float | None = 60.0,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    full = nsenter_argv(netns_path, argv)
    try:
        done = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except FileNotFoundError as exc:
        raise NetlabError(f"command not found: {argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"{' '.join(argv)} timed out after {timeout} s") from exc
    if check and done.returncode != 0:
        where = f" in {netns_path}" if netns_path else ""
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise NetlabError(
            f"{' '.join(argv)}{where} exited with {done.returncode}: "
            f"{detail[-1] if detail else 'no output'}"
        )
    return done


class ManagedProcess:
    """A long-running process the testbed started; output goes to a log file."""

    def __init__(self, popen: subprocess.Popen[bytes], label: str, argv: list[str], log: Path):
        self._popen = popen
        self.pid = popen.pid
        self.label = label
        self.argv = argv
        self.log_path = log
        self.start_time = process_start_time(popen.pid) or 0

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._popen.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout`; returns the exit status."""
        if self._popen.poll() is None:
            signal_group(self.pid, signal.SIGTERM)
            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_group(self.pid, signal.SIGKILL)
                return self._popen.wait(timeout)
        return self._popen.returncode

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid` (processes are started as group leaders)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def start_process(
    netns_path: str | None,
    argv: Sequence[str],
    *,
    label: str,
    log: Path,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> ManagedProcess:
    full = nsenter_argv(netns_path, argv)
    with open(log, "ab") as out:
        try:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: signals reach its children too
                env={**os.environ, **env} if env else None,
                pass_fds=tuple(pass_fds),
            )
        except FileNotFoundError as exc:
            raise NetlabError(f"command not found: {argv[0]}") from exc
    return ManagedProcess(popen, label, list(argv), log)


def stop_recorded_process(pid: int, start_time: int, grace: float = 3.0) -> bool:
    """Stop a process named in a manifest, if it is still that very process."""
    if not is_same_process(pid, start_time):
        return False
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_same_process(pid, start_time) or _is_zombie(pid):
            return True
        time.sleep(0.02)
    signal_group(pid, signal.SIGKILL)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
