"""ProxyProcess: what every proxy process of the mesh does besides proxying, in one place.

A proxy (ztunnel in its inpod, shared and sidecar shapes; the waypoint) subclasses it and
provides `start` (open its listeners), optionally `serve` (work that runs until the process
stops, e.g. the ZDS client), `stop`, `config_dump` and the files it watches. The shell serves
admin (localhost only), metrics and readiness, records connections, reloads the watched
files, and `main` gives each the same command-line handling, logging and signals: SIGTERM
and SIGINT end the process through the same orderly close.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import uvloop

from testbed.mesh.config import ConfigError
from testbed.mesh.hbone.timers import HboneTimers, TimerError
from testbed.mesh.metrics import CONTENT_TYPE, Registry
from testbed.mesh.proxy import ADMIN_HOST, ADMIN_PORT, METRICS_PORT, PUBLIC_HOST, READY_PORT
from testbed.mesh.proxy.connections import ConnectionLog
from testbed.mesh.proxy.http import Query, Response, Routes, serve_http
from testbed.mesh.proxy.watch import Watched, watch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdminPorts:
    """Where the shell's endpoints listen (tests use port 0 and loopback)."""

    admin: int = ADMIN_PORT
    metrics: int = METRICS_PORT
    ready: int = READY_PORT
    admin_host: str = ADMIN_HOST
    public_host: str = PUBLIC_HOST


DEFAULT_PORTS = AdminPorts()


class ProxyProcess:
    def __init__(
        self, registry: Registry, connections: ConnectionLog, ports: AdminPorts = DEFAULT_PORTS
    ) -> None:
        self.registry = registry
        self.connections = connections
        self.ports = ports
        self.ready = False
        self._servers: dict[str, asyncio.Server] = {}

    # -- what a proxy provides ------------------------------------------------------------
    async def start(self) -> None:
        """Open the listeners (and set `ready` once they serve)."""

    async def serve(self) -> None:
        """Work that runs until the process stops; the default waits."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        """Close the listeners."""

    def config_dump(self) -> dict[str, Any]:
        return {}

    def watched(self) -> Sequence[Watched[Any]]:
        return ()

    # -- endpoints --------------------------------------------------------------------------
    def _config_dump(self, query: Query) -> Response:
        return Response(200, json.dumps(self.config_dump(), indent=2).encode(), "application/json")

    def _connections(self, query: Query) -> Response:
        try:
            return Response(200, self.connections.render(query), "application/json")
        except ValueError as exc:
            return Response(400, f"{exc}\n".encode())

    def _metrics(self, query: Query) -> Response:
        return Response(200, self.registry.render().encode(), CONTENT_TYPE)

    def _readiness(self, query: Query) -> Response:
        return Response(200, b"ready\n") if self.ready else Response(503, b"not ready\n")

    def endpoints(self) -> dict[str, tuple[str, int, Routes]]:
        """name -> (host, port, routes) of the shell's three HTTP servers."""
        ports = self.ports
        admin: Routes = {"/config_dump": self._config_dump, "/connections": self._connections}
        metrics: Routes = {"/metrics": self._metrics, "/stats/prometheus": self._metrics}
        ready: Routes = {"/healthz/ready": self._readiness}
        return {
            "admin": (ports.admin_host, ports.admin, admin),
            "metrics": (ports.public_host, ports.metrics, metrics),
            "ready": (ports.public_host, ports.ready, ready),
        }

    def address(self, endpoint: str) -> tuple[str, int]:
        """Where an endpoint ("admin", "metrics", "ready") listens, once open."""
        host, port = self._servers[endpoint].sockets[0].getsockname()[:2]
        return str(host), int(port)

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        for name, (host, port, routes) in self.endpoints().items():
            self._servers[name] = await serve_http(host, port, routes)
        await self.start()

    async def close(self) -> None:
        self.ready = False
        await self.stop()
        for server in self._servers.values():
            server.close()

    async def run(self) -> None:
        """Serve until cancelled (SIGTERM, SIGINT), then close in order."""
        await self.open()
        try:
            await asyncio.gather(self.serve(), *(watch(w) for w in self.watched()))
        finally:
            await self.close()


def main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    make: Callable[[argparse.Namespace], ProxyProcess],
    log_name: Callable[[argparse.Namespace], str],
) -> None:
    """Parse `argv` (a `--log-level` option is added), set up logging, run the proxy
    `make(args)` builds on uvloop until SIGTERM or SIGINT."""
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {log_name(args)} %(levelname)s %(name)s: %(message)s",
    )
    try:
        HboneTimers.from_env()  # a bad timer variable fails now, not at the first connection
        proxy = make(args)
    except (ConfigError, TimerError) as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")  # a bad file is one line, not a traceback
    uvloop.run(_until_signalled(proxy))


async def _until_signalled(proxy: ProxyProcess) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main_task.cancel)
    try:
        await proxy.run()
    except asyncio.CancelledError:
        log.info("stopping")
