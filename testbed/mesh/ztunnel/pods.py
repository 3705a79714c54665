"""One enrolled pod as ztunnel serves it: its three listeners inside the pod's namespace,
the sockets it opens from there (mark 0x539, so the pod's rules let them pass), and its
HBONE client pool (connections leave from the pod's own address)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from testbed.mesh import dns, podsockets
from testbed.mesh.config import Workload
from testbed.mesh.hbone import HboneClient, HboneServer
from testbed.mesh.ztunnel import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from testbed.mesh.ztunnel.netio import Address
from testbed.mesh.ztunnel.state import MeshState
from testbed.netlab.errors import TestbedError
from testbed.netlab.nsutil import setns_fd

log = logging.getLogger(__name__)


@functools.cache
def _home_netns() -> int:
    """ztunnel's own namespace, opened on first use (from the event loop, which is home)."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _marked_socket(family: int, *, transparent: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, podsockets.INPOD_MARK)
        if transparent:
            sock.setsockopt(socket.SOL_IP, podsockets.IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, podsockets.IP_FREEBIND, 1)
    except BaseException:
        sock.close()
        raise
    return sock


Handler = Callable[["PodProxy", socket.socket, Address], Awaitable[None]]


async def accept_forever(
    listener: socket.socket,
    handle: Callable[[socket.socket, Address], Coroutine[Any, Any, None]],
    spawn: Callable[[Coroutine[Any, Any, None]], None],
    what: str,
) -> None:
    """Accept on a non-blocking listener until cancelled; each connection (TCP_NODELAY: the
    relays write what they read at once, Nagle would only add latency) is handled in a
    task `spawn` keeps."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, peer = await loop.sock_accept(listener)
        except OSError as exc:
            log.warning("%s: accept on %s failed: %s", what, listener, exc)
            await asyncio.sleep(0.05)
            continue
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        spawn(handle(conn, (str(peer[0]), int(peer[1]))))


class UnknownWorkloadError(TestbedError, LookupError):
    """The pod the agent enrolled is not in the mesh config."""


class PodProxy:
    def __init__(self, mesh: MeshState, uid: str, netns_fd: int) -> None:
        if mesh.config.workload_by_uid(uid) is None:
            raise UnknownWorkloadError(f"pod {uid} is not in the mesh config")
        self.mesh = mesh
        self.uid = uid
        self.netns_fd = netns_fd
        self.netns_inode = os.fstat(netns_fd).st_ino
        self.listeners: dict[int, socket.socket] = {}
        self.hbone_client = HboneClient(socket_factory=self.upstream_socket)
        self.hbone_server: HboneServer | None = None
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()  # run on after stop (drain)
        # a shared ztunnel with the same-node fast path: the local workload at an address
        self.local_pod: Callable[[str], PodProxy | None] | None = None

    @property
    def workload(self) -> Workload:
        """Looked up per use, so that a config reload applies to running pods."""
        workload = self.mesh.config.workload_by_uid(self.uid)
        if workload is None:
            raise UnknownWorkloadError(f"pod {self.uid} is not in the mesh config")
        return workload

    @property
    def ip(self) -> str:
        return str(self.workload.workload_ips[0])

    # -- sockets in the pod's namespace ------------------------------------------------
    def upstream_socket(self, family: int) -> socket.socket:
        return self._in_pod(lambda: _marked_socket(family, transparent=False))

    def transparent_socket(self, family: int) -> socket.socket:
        """For connecting to the app with the client's address as the source."""
        return self._in_pod(lambda: _marked_socket(family, transparent=True))

    def _in_pod(self, make: Callable[[], socket.socket]) -> socket.socket:
        """Create a socket inside the pod's namespace on the calling (event-loop) thread:
        setns there and straight back, ~15 us, where a helper thread costs ~500 us. Nothing
        else runs on this thread in between."""
        setns_fd(self.netns_fd)
        try:
            return make()
        finally:
            setns_fd(_home_netns())

    async def _listen(self, port: int, *, transparent: bool) -> socket.socket:
        sock = await asyncio.to_thread(
            podsockets.listen_in_netns, self.netns_fd, port, transparent=transparent
        )
        sock.setblocking(False)
        self.listeners[port] = sock
        return sock

    # -- lifecycle -----------------------------------------------------------------------
    async def start(
        self, outbound: Handler, inbound_plaintext: Handler, hbone: HboneServer
    ) -> None:
        """Open the listeners; inbound ones are transparent so TPROXY can deliver to them."""
        try:
            out_sock = await self._listen(OUTBOUND_PORT, transparent=False)
            plain_sock = await self._listen(INBOUND_PLAINTEXT_PORT, transparent=True)
            hbone_sock = await self._listen(HBONE_PORT, transparent=True)
            self.hbone_server = hbone
            await hbone.start(hbone_sock)
        except BaseException:
            await self.stop()
            raise
        for sock, handler in ((out_sock, outbound), (plain_sock, inbound_plaintext)):
            self._accepting.append(asyncio.ensure_future(self._accept_loop(sock, handler)))
        zone = lambda _peer: dns.proxy_zone(self.mesh.config, self.workload.namespace)  # noqa: E731
        self._accepting.append(asyncio.ensure_future(dns.serve_in_netns(self.netns_fd, zone)))

    async def stop(self) -> None:
        """Stop accepting and close the HBONE server (resetting its streams); outbound and
        plaintext connections already relaying carry on until they end."""
        for task in self._accepting:
            task.cancel()
        if self.hbone_server is not None:
            await self.hbone_server.close()
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        await self.hbone_client.close()
        with contextlib.suppress(OSError):
            os.close(self.netns_fd)

    async def _accept_loop(self, listener: socket.socket, handler: Handler) -> None:
        def spawn(work: Coroutine[Any, Any, None]) -> None:
            task = asyncio.ensure_future(work)
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        await accept_forever(
            listener, lambda conn, peer: self._handle(handler, conn, peer), spawn, f"pod {self.uid}"
        )

    async def _handle(self, handler: Handler, conn: socket.socket, peer: Address) -> None:
        try:
            await handler(self, conn, peer)
        except Exception:
            log.exception("pod %s: connection from %s failed", self.uid, peer)
            conn.close()
