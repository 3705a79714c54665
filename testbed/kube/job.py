"""The entry point of an exported experiment's Kubernetes Job: `python -m testbed.kube.job`.

It runs the client side of each case with the testbed's own workload functions
(testbed.experiment.workloads over testbed.measure), the same warm-up rule as the runner, and
prints one JSON row per measurement on stdout (diagnostics go to stderr), in the tidy format
of testbed.results, so `kubectl logs job/NAME > rows.jsonl` is what `testbed import` reads.

The servers run already, in the exported server Deployment (iperf3 -s, sockperf server, the
rr server and the HTTP echo server): `RemoteServer` stands for that pod where the workload
functions expect a host to spawn a server in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from typing_extensions import Unpack

from testbed.experiment.cases import Case, separate_warmup
from testbed.experiment.rows import case_row, failed_row, measurement_rows
from testbed.experiment.workloads import WORKLOADS
from testbed.netlab.host import DEFAULT_TIMEOUT, RunOptions, SpawnOptions

PLATFORM = "kubernetes"
PROBE_TIMEOUT = 2.0
PROBE_SETTLE = 0.5  # seconds for a server to finish handling the probe connection


class LocalProcess:
    """A process started in the Job's own container."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None) -> None:
        self.popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def terminate(self, timeout: float = 5.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def output(self) -> str:
        return self.popen.stdout.read() if self.popen.stdout and self.poll() is not None else ""


class ContainerHost:
    """The Job's container as a measure Host: commands run directly in it."""

    def run(
        self, argv: Sequence[str], **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=options.get("timeout", DEFAULT_TIMEOUT),
            check=options.get("check", True),
            input=options.get("input"),
        )

    def spawn(
        self, argv: Sequence[str], *, label: str, **options: Unpack[SpawnOptions]
    ) -> LocalProcess:
        return LocalProcess(argv, options.get("env"))


class AlreadyServing:
    """The server process of a RemoteServer: it runs in another pod, for as long as that pod."""

    pid = 0

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        raise subprocess.TimeoutExpired("remote server", timeout or 0)

    def terminate(self, timeout: float = 5.0) -> int | None:
        return None

    def output(self) -> str:
        return ""


class RemoteServer:
    """The server pod, reached at `ip`. Spawning a server returns the one already running;
    the only command it answers is the "is it listening" probe (ss -ltn sport = :PORT) of
    testbed.measure.servers, answered by connecting to the port."""

    def __init__(self, ip: str, name: str) -> None:
        self.ip = ip
        self.name = name
        self.listening: set[int] = set()  # ports seen listening: the servers run on

    def spawn(
        self, argv: Sequence[str], *, label: str, **options: Unpack[SpawnOptions]
    ) -> AlreadyServing:
        return AlreadyServing()

    def run(
        self, argv: Sequence[str], **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        words = list(argv)
        if words[:2] != ["ss", "-H"] or not words[-1].startswith(":"):
            raise RuntimeError(f"RemoteServer runs no commands; asked for {words}")
        port = int(words[-1][1:])
        if port not in self.listening and self._probe(port):
            self.listening.add(port)
        listening = f"LISTEN {self.ip}:{port}\n" if port in self.listening else ""
        return subprocess.CompletedProcess(words, 0 if listening else 1, listening, "")

    def _probe(self, port: int) -> bool:
        """Connect once. A one-test-at-a-time server (iperf3) treats the probe as a failed
        test and resets a client that comes in meanwhile, so give it time to get over it;
        later probes of the port are answered from memory, since the servers keep running."""
        try:
            with socket.create_connection((self.ip, port), timeout=PROBE_TIMEOUT):
                pass
        except OSError:
            return False
        time.sleep(PROBE_SETTLE)
        return True


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_case(
    case: Case, client: Any, server: Any, context: dict[str, Any], facts: dict[str, str]
) -> list[dict[str, Any]]:
    base = case_row(case, context, facts, utc_now())
    workload = WORKLOADS[case.workload]
    try:
        if separate_warmup(case):
            workload(client, server, replace(case, duration=case.warmup), None)
        measured = list(workload(client, server, case, None))
    except Exception as exc:
        return [failed_row(base, "failed", f"{type(exc).__name__}: {exc}")]
    return measurement_rows(base, measured)


def cluster_facts() -> dict[str, str]:
    return {
        "platform": PLATFORM,
        "k8s_node": os.environ.get("NODE_NAME", ""),
        "kernel": platform.release(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.kube.job", description=__doc__)
    parser.add_argument("--server", required=True, help="server host name or IP")
    parser.add_argument("--server-name", default="server", help="the server pod's name")
    parser.add_argument("--cases", required=True, help="JSON list of case parameters")
    parser.add_argument("--context", required=True, help="JSON: experiment, run_id, ...")
    args = parser.parse_args(argv)
    cases = [Case(**params) for params in json.loads(args.cases)]
    context = json.loads(args.context)
    ip = socket.gethostbyname(args.server)
    client, server = ContainerHost(), RemoteServer(ip, args.server_name)
    facts = cluster_facts()
    for index, case in enumerate(cases, start=1):
        started = time.monotonic()
        for row in run_case(case, client, server, context, facts):
            print(json.dumps(row, default=str), flush=True)
        took = time.monotonic() - started
        print(f"case {index}/{len(cases)} {case.describe()}: {took:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
