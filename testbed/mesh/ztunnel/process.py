"""What the three ztunnel shapes (inpod, shared, sidecar) share on top of the proxy shell:
the mesh state, the pods served, /config_dump, the mesh config reload and the command line
`--config FILE --certs DIR --node NAME` plus each shape's own options."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from testbed.mesh.config import LocalConfig
from testbed.mesh.proxy import shell
from testbed.mesh.proxy.connections import ProxyKind
from testbed.mesh.proxy.shell import DEFAULT_PORTS, AdminPorts, ProxyProcess
from testbed.mesh.proxy.watch import Watched
from testbed.mesh.ztunnel.certs import CertStore
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.state import MeshState

log = logging.getLogger(__name__)


class ZtunnelProcess(ProxyProcess):
    shape = "inpod"  # what the subclass serves, for /config_dump and logs

    def __init__(
        self,
        config: Path,
        certs: Path,
        node: str,
        proxy: ProxyKind = "ztunnel",
        ports: AdminPorts = DEFAULT_PORTS,
    ) -> None:
        self.config_path = config
        self.node = node
        self.mesh = MeshState(LocalConfig.load(config), CertStore(certs), node, proxy)
        super().__init__(self.mesh.registry, self.mesh.connections, ports)
        self.pods: dict[str, PodProxy] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_config(self, config: LocalConfig) -> None:
        self.mesh.update(config)
        log.info("mesh config reloaded (%s)", self.mesh.digest[:12])

    def watched(self) -> Sequence[Watched[Any]]:
        return [Watched(self.config_path, LocalConfig.load, self.on_config)]

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task that is kept until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def config_dump(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "shape": self.shape,
            "configDigest": self.mesh.digest,
            "ready": self.ready,
            "pods": {
                uid: {"ip": pod.ip, "identity": pod.workload.identity.uri}
                for uid, pod in self.pods.items()
            },
            "certificates": self.mesh.certs.identities(),
            "config": self.mesh.config.model_dump(mode="json", by_alias=True),
        }

    async def stop(self) -> None:
        for pod in list(self.pods.values()):
            await pod.stop()
        self.pods.clear()


def main(
    module: str,
    make: Callable[[argparse.Namespace], ZtunnelProcess],
    extra: dict[str, str],
    description: str | None = None,
    optional: dict[str, str] | None = None,
) -> None:
    """`python -m <module> --config --certs --node` plus `extra` options (name -> help) and
    `optional` file options (name -> help; absent: None), parsed from sys.argv."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--config", type=Path, required=True, help="mesh config (local YAML)")
    parser.add_argument("--certs", type=Path, required=True, help="workload certificate folder")
    parser.add_argument("--node", required=True, help="the node this proxy serves")
    for name, text in extra.items():
        parser.add_argument(f"--{name}", required=True, help=text)
    for name, text in (optional or {}).items():
        parser.add_argument(f"--{name}", type=Path, default=None, help=text)
    shape = module.rsplit(".", 1)[-1]
    prefix = "ztunnel" if shape == "ztunnel" else f"ztunnel-{shape}"
    shell.main(parser, sys.argv[1:], make, lambda args: f"{prefix}-{args.node}")
