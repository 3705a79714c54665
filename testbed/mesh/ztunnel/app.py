"""The inpod ztunnel process: the node agent hands it each enrolled pod over ZDS, and it
serves that pod's listeners inside the pod's namespace."""

from __future__ import annotations

import argparse
import logging
import os

from testbed.mesh import zds
from testbed.mesh.hbone import HboneServer
from testbed.mesh.zds_client import ZdsClient
from testbed.mesh.ztunnel.inbound import HboneInbound, serve_inbound_plaintext
from testbed.mesh.ztunnel.outbound import serve_outbound
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.process import ZtunnelProcess

log = logging.getLogger(__name__)


class Ztunnel(ZtunnelProcess):
    """Also the ZDS handler: the agent's Add/Del/SnapshotSent land here. Readiness follows
    the first snapshot. Pods need no goodbye at exit: the agent replays them to the next
    ztunnel."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.config, args.certs, args.node)
        self.zds_socket: str = args.zds_socket

    async def serve(self) -> None:
        log.info("ztunnel for %s up; agent at %s", self.node, self.zds_socket)
        await ZdsClient(self.zds_socket, self).run()

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
