"""The ztunnel process: mesh state, enrolled pods (from ZDS), admin endpoints, config reload."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from testbed.mesh import config as mesh_config
from testbed.mesh import zds
from testbed.mesh.config import LocalConfig
from testbed.mesh.hbone import HboneServer
from testbed.mesh.metrics import CONTENT_TYPE
from testbed.mesh.zds_client import ZdsClient
from testbed.mesh.ztunnel import ADMIN_PORT, METRICS_PORT, READY_PORT
from testbed.mesh.ztunnel.admin import Response, Routes, serve_http
from testbed.mesh.ztunnel.certs import CertStore
from testbed.mesh.ztunnel.inbound import HboneInbound, serve_inbound_plaintext
from testbed.mesh.ztunnel.outbound import serve_outbound
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.state import MeshState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    config: Path
    certs: Path
    zds_socket: str
    node: str
    admin_host: str = "0.0.0.0"


class Ztunnel:
    """Also the ZDS handler: the agent's Add/Del/SnapshotSent land here."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mesh = MeshState(
            LocalConfig.load(settings.config), CertStore(settings.certs), settings.node
        )
        self.pods: dict[str, PodProxy] = {}
        self.ready = False

    # -- ZDS --------------------------------------------------------------------------
    async def on_add(self, uid: str, info: zds.WorkloadInfo | None, netns_fd: int) -> str:
        existing = self.pods.get(uid)
        if existing is not None and existing.netns_inode == os.fstat(netns_fd).st_ino:
            os.close(netns_fd)  # the agent replays a pod we serve already
            return ""
        if existing is not None:
            await self._remove(uid)
        pod = PodProxy(self.mesh, uid, netns_fd)
        identity = pod.workload.identity
        hbone = HboneServer(self.mesh.certs.server_context(identity), HboneInbound(pod))
        await pod.start(serve_outbound, serve_inbound_plaintext, hbone)
        self.pods[uid] = pod
        log.info("pod %s (%s, %s) enrolled", uid, pod.ip, identity)
        return ""

    async def on_delete(self, uid: str) -> None:
        await self._remove(uid)

    async def on_snapshot_done(self, uids: set[str]) -> None:
        for stale in set(self.pods) - uids:
            await self._remove(stale)
        self.ready = True
        log.info("snapshot processed: %d pods", len(self.pods))

    async def _remove(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            await pod.stop()
            log.info("pod %s removed", uid)

    # -- config -------------------------------------------------------------------------
    def on_config(self, config: LocalConfig) -> None:
        self.mesh.update(config)
        log.info("mesh config reloaded (%s)", self.mesh.digest[:12])

    # -- HTTP endpoints -------------------------------------------------------------------
    def config_dump(self) -> Response:
        dump = {
            "node": self.settings.node,
            "configDigest": self.mesh.digest,
            "ready": self.ready,
            "pods": {
                uid: {"ip": pod.ip, "identity": pod.workload.identity.uri}
                for uid, pod in self.pods.items()
            },
            "certificates": self.mesh.certs.identities(),
            "config": self.mesh.config.model_dump(mode="json", by_alias=True),
        }
        return Response(200, json.dumps(dump, indent=2).encode(), "application/json")

    def metrics(self) -> Response:
        return Response(200, self.mesh.registry.render().encode(), CONTENT_TYPE)

    def readiness(self) -> Response:
        return Response(200, b"ready\n") if self.ready else Response(503, b"not ready\n")

    def _routes(self) -> dict[int, Routes]:
        return {
            ADMIN_PORT: {"/config_dump": self.config_dump},
            METRICS_PORT: {"/metrics": self.metrics, "/stats/prometheus": self.metrics},
            READY_PORT: {"/healthz/ready": self.readiness},
        }

    # -- main ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT. Pods need no goodbye: their sockets close with the
        process, and the agent replays them to the next ztunnel."""
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, main.cancel)
        servers = [
            await serve_http(self.settings.admin_host, port, routes)
            for port, routes in self._routes().items()
        ]
        zds_client = ZdsClient(self.settings.zds_socket, self)
        log.info("ztunnel for %s up; agent at %s", self.settings.node, self.settings.zds_socket)
        try:
            await asyncio.gather(
                zds_client.run(), mesh_config.watch(self.settings.config, self.on_config)
            )
        except asyncio.CancelledError:
            log.info("ztunnel for %s stopping", self.settings.node)
        finally:
            for server in servers:
                server.close()
