"""The apps topologies declare in their pods (`add_pod(..., app=...)`): started once the mode
is installed (so in-pod rules are in place), waited for until they listen, stopped with the
testbed. Nothing is restarted: an app that exits stays exited, with its code and output.

Each app runs under `sh`, which writes the app's exit status to a file when it ends. The
status survives the process that started it (`testbed up --detach` returns), so any later
`testbed inspect` can tell running from exited and say the code.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.cluster.model import AppSpec
from testbed.netlab import ManagedProcess
from testbed.netlab.process import NetlabError, is_same_process

if TYPE_CHECKING:
    from testbed.cluster.cluster import Pod
    from testbed.netlab import Lab

LISTEN_TIMEOUT = 20.0  # seconds; a loaded machine starts a Python server slowly
OUTPUT_LINES = 10  # lines of an app's output `inspect` shows once it exited
# `sh -c SCRIPT EXIT_FILE ARGV...`: runs ARGV, then writes its status where "$0" says
# (through a rename, so a reader never sees a half-written file).
_RECORD_EXIT = '"$@"; rc=$?; echo "$rc" > "$0.tmp" && mv "$0.tmp" "$0"'


def app_argv(pod: str, app: AppSpec) -> list[str]:
    """The server's command line (what the pod runs, before the exit-recording shell)."""
    port, extra = str(app.port), list(app.argv)
    if app.kind == "http-echo":
        echo = [sys.executable, "-m", "testbed.workloads.http_echo"]
        return [*echo, "--name", pod, "--port", port, *extra]
    if app.kind == "iperf3":
        return ["iperf3", "-s", "-p", port, *extra]
    if app.kind == "sockperf":
        return ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", port, *extra]
    return extra


class RunningApp:
    """One declared app: its process and where its exit status will appear."""

    def __init__(self, pod: Pod, app: AppSpec, process: ManagedProcess, exit_file: Path):
        self.pod = pod
        self.app = app
        self.process = process
        self.exit_file = exit_file

    def record(self) -> dict[str, Any]:
        """What the inventory keeps: enough for `app_state` in another process."""
        return {
            "pod": self.pod.name,
            "app": self.app.kind,
            "command": shlex.join(app_argv(self.pod.name, self.app)),
            "port": self.app.port,
            "pid": self.process.pid,
            "start_time": self.process.start_time,
            "log": str(self.process.log_path),
            "exit_file": str(self.exit_file),
        }


def start_apps(lab: Lab, pods: list[Pod]) -> list[RunningApp]:
    """Start every pod's app, then wait until each listens on its port or has exited.
    An app still not listening after LISTEN_TIMEOUT is an error (the caller tears down)."""
    started = [_start(lab, pod, pod.spec.app) for pod in pods if pod.spec.app is not None]
    deadline = time.monotonic() + LISTEN_TIMEOUT
    for app in started:
        while app.app.port is not None and not _listening(app.pod, app.app.port):
            if app.process.poll() is not None:
                break  # it crashed: reported as exited, not restarted, not hidden
            if time.monotonic() > deadline:
                raise NetlabError(
                    f"pod {app.pod.name}: app {app.app.describe()} does not listen on port "
                    f"{app.app.port} after {LISTEN_TIMEOUT:.0f} s; its output: "
                    f"{_tail(app.process.log_path, 3) or 'none'}"
                )
            time.sleep(0.1)
    return started


def _start(lab: Lab, pod: Pod, app: AppSpec) -> RunningApp:
    exit_file = lab.add_file(lab.workdir / f"app-{pod.name}.exit")
    lab.add_file(lab.workdir / f"app-{pod.name}.exit.tmp")
    argv = ["sh", "-c", _RECORD_EXIT, str(exit_file), *app_argv(pod.name, app)]
    return RunningApp(pod, app, pod.spawn(argv, label=f"app-{app.label}"), exit_file)


def _listening(pod: Pod, port: int) -> bool:
    """Whether a TCP socket in the pod's namespace listens on `port`."""
    done = pod.run(["ss", "-H", "-ltn", "sport", "=", f":{port}"], timeout=5.0, check=False)
    return done.returncode == 0 and bool(done.stdout.strip())


def app_state(record: dict[str, Any]) -> dict[str, Any]:
    """An inventory app record with its state now: "running", or "exited" with the exit
    code (128+N: killed by signal N) and the last lines of its output; "gone" if the process
    disappeared without an exit status (killed with its shell)."""
    state: dict[str, Any] = dict(record)
    exit_file = Path(record["exit_file"])
    if exit_file.exists():
        text = exit_file.read_text(encoding="ascii", errors="replace").strip()
        state["state"] = "exited"
        state["exit_code"] = int(text) if text.isdigit() else None
    elif is_same_process(record["pid"], record["start_time"]):
        state["state"] = "running"
    else:
        state["state"] = "gone"
    if state["state"] != "running":
        state["output"] = _tail(Path(record["log"]), OUTPUT_LINES)
    return state


def _tail(log: Path, lines: int) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
