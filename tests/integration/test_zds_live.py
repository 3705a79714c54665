"""CNI agent -> ztunnel with real pod namespaces: the netns fd passed over ZDS is what
ztunnel uses to open its listeners inside the pod, where they capture the app's traffic."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from testbed.mesh import podsockets, zds
from testbed.mesh.zds_client import ZdsClient
from testbed.netlab import nsutil
from testbed.netlab.netns import Netns
from testbed.redirect import inpod_rules
from testbed.redirect.cni_agent import CniAgent

ZTUNNEL_PORTS = (15001, 15006, 15008)


class MiniZtunnel:
    """Just ztunnel's inpod bookkeeping: listeners per enrolled pod."""

    def __init__(self) -> None:
        self.listeners: dict[str, list[socket.socket]] = {}
        self.snapshots = threading.Semaphore(0)

    async def on_add(self, uid: str, info: zds.WorkloadInfo | None, netns_fd: int) -> str:
        try:
            socks = [
                await asyncio.to_thread(podsockets.listen_in_netns, netns_fd, port)
                for port in ZTUNNEL_PORTS
            ]
        finally:
            os.close(netns_fd)  # the sockets keep the namespace alive
        self._close(uid)
        self.listeners[uid] = socks
        return ""

    def on_delete(self, uid: str) -> None:
        self._close(uid)

    def on_snapshot_done(self, uids: set[str]) -> None:
        for stale in set(self.listeners) - uids:
            self._close(stale)
        self.snapshots.release()

    def _close(self, uid: str) -> None:
        for sock in self.listeners.pop(uid, []):
            sock.close()


class ZtunnelProcess:
    """The client on a uvloop event loop in its own thread, as ztunnel would run it."""

    def __init__(self, path: str) -> None:
        self.mesh = MiniZtunnel()
        self.loop = uvloop.new_event_loop()
        self.task = self.loop.create_task(ZdsClient(path, self.mesh, min_backoff=0.01).run())
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=5)
        for uid in list(self.mesh.listeners):
            self.mesh.on_delete(uid)
        self.loop.close()


@pytest.fixture
def pods() -> Iterator[list[Netns]]:
    tag = uuid.uuid4().hex[:6]
    names = [f"tbt-zds-{tag}-a", f"tbt-zds-{tag}-b"]
    try:
        for name in names:
            nsutil.create_netns(name)
            Netns(name).run(["ip", "link", "set", "lo", "up"])
        yield [Netns(name) for name in names]
    finally:
        for name in names:
            nsutil.delete_netns(name)


def listening_ports(netns: Netns) -> set[int]:
    lines = netns.run(["ss", "-Hltn"]).stdout.splitlines()
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in lines}


INFO = zds.WorkloadInfo("sleep", "default", "sleep")


def test_enrolled_pod_gets_ztunnel_listeners(pods: list[Netns], tmp_path: Path) -> None:
    pod_a, pod_b = pods
    with CniAgent(tmp_path / "ztunnel.sock") as agent:
        ztunnel = ZtunnelProcess(agent.socket_path)
        try:
            agent.enroll("uid-a", INFO, pod_a.path)
            assert listening_ports(pod_a) == set(ZTUNNEL_PORTS)
            assert listening_ports(pod_b) == set()
            agent.unenroll("uid-a")
            assert listening_ports(pod_a) == set()
            agent.enroll("uid-b", INFO, pod_b.path)
        finally:
            ztunnel.stop()
        assert listening_ports(pod_b) == set()

        # a restarted ztunnel gets the snapshot and re-creates the listeners
        ztunnel = ZtunnelProcess(agent.socket_path)
        try:
            assert ztunnel.mesh.snapshots.acquire(timeout=5)
            assert listening_ports(pod_b) == set(ZTUNNEL_PORTS)
            assert listening_ports(pod_a) == set()
        finally:
            ztunnel.stop()


def test_app_traffic_reaches_listener_made_from_passed_fd(
    pods: list[Netns], tmp_path: Path
) -> None:
    pod = pods[0]
    # an interface with a route, so the app's connect gets as far as the capture rules
    pod.run(["ip", "link", "add", "v0", "type", "veth", "peer", "v1"])
    pod.run(["ip", "addr", "add", "10.78.0.1/24", "dev", "v0"])
    for link in ("v0", "v1"):
        pod.run(["ip", "link", "set", link, "up"])
    inpod_rules.install(pod, "redirect")
    with CniAgent(tmp_path / "ztunnel.sock") as agent:
        ztunnel = ZtunnelProcess(agent.socket_path)
        try:
            agent.enroll("uid-a", INFO, pod.path)
            outbound = ztunnel.mesh.listeners["uid-a"][0]
            app_fd = os.open(pod.path, os.O_RDONLY)
            try:
                app = podsockets.socket_in_netns(app_fd, mark=None)
            finally:
                os.close(app_fd)
            with app:
                app.settimeout(3)
                app.connect(("10.78.0.9", 80))
                outbound.settimeout(3)
                captured, _ = outbound.accept()
                with captured:
                    assert podsockets.original_dst(captured) == ("10.78.0.9", 80)
        finally:
            ztunnel.stop()
