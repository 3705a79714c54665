"""ztunnel's side of ZDS: receive enrolled pods (and their netns fds) from the node agent.

Runs as an asyncio task (uvloop is fine). SCM_RIGHTS needs recvmsg, which the event loop
has no coroutine for, so the socket is non-blocking and a one-shot reader callback wakes
the task when a packet is waiting; `socket.recv_fds` then reads it. If the agent goes away
the client reconnects with exponential backoff; each new connection starts with a hello
and is answered with a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Awaitable
from typing import Protocol

from testbed.mesh import zds

log = logging.getLogger(__name__)


class ZdsHandler(Protocol):
    """What ztunnel does with the agent's requests. Methods may be sync or async.

    on_add owns `netns_fd` when it returns "" (success); otherwise the client closes it.
    on_snapshot_done gets the uids the agent sent (Add or Keep) since it connected;
    ztunnel drops every pod not among them.
    """

    def on_add(
        self, uid: str, info: zds.WorkloadInfo | None, netns_fd: int
    ) -> str | Awaitable[str]: ...

    def on_delete(self, uid: str) -> None | Awaitable[None]: ...

    def on_snapshot_done(self, uids: set[str]) -> None | Awaitable[None]: ...


async def _settle(result: object) -> object:
    return await result if inspect.isawaitable(result) else result


class ZdsClient:
    def __init__(
        self,
        socket_path: str,
        handler: ZdsHandler,
        *,
        min_backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.socket_path = socket_path
        self.handler = handler
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.connections = 0  # how many times a session started (tests, metrics)

    async def run(self) -> None:
        """Connect, serve, reconnect; until cancelled."""
        backoff = self.min_backoff
        while True:
            try:
                sock = await self._connect()
            except OSError as exc:
                log.debug("zds: agent at %s not reachable: %s", self.socket_path, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff
            try:
                await self._session(sock)
            except (OSError, zds.ZdsDecodeError) as exc:
                log.warning("zds: session with agent ended: %s", exc)
            finally:
                sock.close()

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.socket_path)
            await loop.sock_sendall(sock, zds.encode_hello())  # one packet: SEQPACKET
        except BaseException:
            sock.close()
            raise
        self.connections += 1
        return sock

    async def _session(self, sock: socket.socket) -> None:
        seen: set[str] = set()
        while True:
            data, fds = await _recv(sock)
            if not data:
                for fd in fds:
                    os.close(fd)
                return  # the agent closed the connection
            loop = asyncio.get_running_loop()
            try:
                request = zds.decode_request(data)
            except zds.ZdsDecodeError as exc:
                # As Istio's ztunnel: nack what cannot be read, then end the session.
                for fd in fds:
                    os.close(fd)
                await loop.sock_sendall(sock, zds.encode_ack(f"failure to read message: {exc}"))
                raise
            error = await self._dispatch(request, fds, seen)
            await loop.sock_sendall(sock, zds.encode_ack(error))

    async def _dispatch(self, request: zds.WorkloadRequest, fds: list[int], seen: set[str]) -> str:
        netns_fd, extra = (fds[0], fds[1:]) if fds else (None, [])
        for fd in extra:
            os.close(fd)
        if isinstance(request, zds.AddWorkload):
            if netns_fd is None:
                return f"add {request.uid}: no netns fd attached"
            seen.add(request.uid)
            return await self._add(request, netns_fd)
        if netns_fd is not None:
            os.close(netns_fd)  # only Add carries a namespace
        if isinstance(request, zds.KeepWorkload):
            seen.add(request.uid)
        elif isinstance(request, zds.DelWorkload):
            await _settle(self.handler.on_delete(request.uid))
        else:
            await _settle(self.handler.on_snapshot_done(set(seen)))
        return ""

    async def _add(self, request: zds.AddWorkload, netns_fd: int) -> str:
        try:
            outcome = await _settle(self.handler.on_add(request.uid, request.info, netns_fd))
            error = str(outcome or "")
        except Exception as exc:  # reported to the agent rather than killing the session
            log.exception("zds: on_add(%s) failed", request.uid)
            error = f"add {request.uid}: {exc}"
        if error:
            os.close(netns_fd)
        return error


async def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and its fds, waiting on the event loop until one is there."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return zds.recv_packet(sock)
        except BlockingIOError:
            pass
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), _resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
