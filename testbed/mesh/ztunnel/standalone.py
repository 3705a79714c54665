"""A ztunnel process that needs no CNI agent (the legacy and sidecar shapes): its mesh state,
admin endpoints (15000 /config_dump, 15020 /metrics, 15021 /healthz/ready), config reload,
and the command line they share.

Subclasses open their listeners in `serve()` and keep their workloads in `pods`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from testbed.mesh import config as mesh_config
from testbed.mesh.config import LocalConfig
from testbed.mesh.metrics import CONTENT_TYPE
from testbed.mesh.ztunnel import ADMIN_PORT, METRICS_PORT, READY_PORT
from testbed.mesh.ztunnel.admin import Response, Routes, serve_http
from testbed.mesh.ztunnel.certs import CertStore
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.state import MeshState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    config: Path
    certs: Path
    node: str
    shape: str  # what `serve()` does, for /config_dump and logs
    extra: dict[str, str]  # the shape's own arguments


class StandaloneProxy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mesh = MeshState(
            LocalConfig.load(settings.config), CertStore(settings.certs), settings.node
        )
        self.pods: dict[str, PodProxy] = {}
        self.ready = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Open the listeners and set `ready`; runs until cancelled."""
        raise NotImplementedError

    def on_config(self, config: LocalConfig) -> None:
        self.mesh.update(config)
        log.info("mesh config reloaded (%s)", self.mesh.digest[:12])

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` as a task that is kept until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- HTTP endpoints -------------------------------------------------------------------
    def config_dump(self) -> Response:
        dump = {
            "node": self.settings.node,
            "shape": self.settings.shape,
            "configDigest": self.mesh.digest,
            "ready": self.ready,
            "pods": {uid: {"ip": pod.ip} for uid, pod in self.pods.items()},
            "certificates": self.mesh.certs.identities(),
        }
        return Response(200, json.dumps(dump, indent=2).encode(), "application/json")

    def metrics(self) -> Response:
        return Response(200, self.mesh.registry.render().encode(), CONTENT_TYPE)

    def readiness(self) -> Response:
        return Response(200, b"ready\n") if self.ready else Response(503, b"not ready\n")

    async def run(self) -> None:
        routes: dict[int, Routes] = {
            ADMIN_PORT: {"/config_dump": self.config_dump},
            METRICS_PORT: {"/metrics": self.metrics, "/stats/prometheus": self.metrics},
            READY_PORT: {"/healthz/ready": self.readiness},
        }
        servers = [await serve_http("0.0.0.0", port, paths) for port, paths in routes.items()]
        log.info("ztunnel (%s) for %s starting", self.settings.shape, self.settings.node)
        try:
            await asyncio.gather(
                self.serve(), mesh_config.watch(self.settings.config, self.on_config)
            )
        finally:
            for server in servers:
                server.close()
            for pod in self.pods.values():
                await pod.stop()


def main(
    argv: list[str],
    shape: str,
    make: Callable[[Settings], StandaloneProxy],
    extra: dict[str, str],
) -> None:
    """Parse `--config --certs --node` plus the shape's `extra` options (name -> help)."""
    parser = argparse.ArgumentParser(prog=f"python -m testbed.mesh.ztunnel.{shape}")
    parser.add_argument("--config", type=Path, required=True, help="mesh config (local YAML)")
    parser.add_argument("--certs", type=Path, required=True, help="workload certificate folder")
    parser.add_argument("--node", required=True, help="the node this proxy serves")
    for name, text in extra.items():
        parser.add_argument(f"--{name}", required=True, help=text)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s ztunnel-{shape}-{args.node} %(levelname)s %(name)s: %(message)s",
    )
    values = {name: str(getattr(args, name.replace("-", "_"))) for name in extra}
    settings = Settings(args.config, args.certs, args.node, shape, values)
    # SIGTERM ends the event loop like Ctrl-C does, so listeners close in order.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(make(settings).run())
