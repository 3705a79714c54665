"""CPU pinning of the client and server workloads, by prefixing their commands with taskset.

Waking a process on the other vCPU costs ~40 us on a 2-vCPU machine (sockperf), so unpinned
latency is bimodal; "split" keeps client and server each on its own CPU.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

from typing_extensions import Unpack

from testbed.netlab.host import Host, Process, RunOptions, SpawnOptions

SPLIT_CPUS = {"client": 0, "server": 1}


class PinnedHost:
    """A pod handle whose run() and spawn() execute under `taskset -c <cpu>`.

    taskset execs the command, so a spawned process keeps the pid its handle reports.
    Every other attribute (ip, node, name, netns...) is the wrapped pod's.
    """

    def __init__(self, host: Host, cpu: int) -> None:
        self._host = host
        self.cpu = cpu

    def _pinned(self, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", str(self.cpu), *argv]

    def run(
        self, argv: Sequence[str], **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        return self._host.run(self._pinned(argv), **options)

    def spawn(self, argv: Sequence[str], *, label: str, **options: Unpack[SpawnOptions]) -> Process:
        return self._host.spawn(self._pinned(argv), label=label, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


def apply_pinning(policy: str, client: Any, server: Any) -> tuple[Any, Any]:
    if policy == "split":
        return PinnedHost(client, SPLIT_CPUS["client"]), PinnedHost(server, SPLIT_CPUS["server"])
    return client, server


def describe_pinning(policy: str) -> dict[str, object]:
    if policy == "split":
        return {"policy": policy, "cpus": dict(SPLIT_CPUS), "proxies": "as the mode starts them"}
    return {"policy": policy}
