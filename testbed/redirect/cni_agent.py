"""The node agent's side of ZDS: hands enrolled pods' netns fds to the node's ztunnel.

Like Istio's istio-cni node agent, it listens on a unix SEQPACKET socket; ztunnel connects
and says hello, the agent replays its snapshot (an Add per enrolled pod, then SnapshotSent)
and from then on sends Add/Del as pods are enrolled and unenrolled, waiting for ztunnel's
ack to each. When ztunnel restarts and reconnects, the snapshot is replayed.

All of it runs on one background thread plus the caller's thread, so it can be driven
from plain synchronous code: `enroll()` returns once ztunnel has acknowledged the pod.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from testbed.mesh import zds
from testbed.netlab.errors import TestbedError

log = logging.getLogger(__name__)

_ACCEPT_POLL = 0.2  # how often the accept loop looks at the stop flag (s)


class ZdsError(TestbedError, RuntimeError):
    """A pod could not be handed to ztunnel."""


class ZtunnelNotConnectedError(ZdsError):
    pass


class ZtunnelRejectedError(ZdsError):
    """ztunnel acknowledged with an error message."""


@dataclass
class _Pod:
    info: zds.WorkloadInfo
    netns_fd: int  # held open while enrolled, so the snapshot can be replayed any time


class CniAgent:
    """Serves ZDS on `socket_path` (the caller records the path in its run manifest)."""

    def __init__(self, socket_path: str | Path, *, ack_timeout: float = 5.0) -> None:
        self.socket_path = str(socket_path)
        self.ack_timeout = ack_timeout
        self.snapshots_sent = 0
        self._pods: dict[str, _Pod] = {}
        self._conn: socket.socket | None = None
        self._cond = threading.Condition()  # guards pods and conn; one exchange at a time
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # left over by an agent that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.socket_path)
        listener.listen(4)
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="cni-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._cond:
            self._drop_connection()
            for pod in self._pods.values():
                os.close(pod.netns_fd)
            self._pods.clear()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> CniAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ public operations

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def enrolled(self) -> list[str]:
        with self._cond:
            return list(self._pods)

    def wait_connected(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._await_connection(timeout)

    def enroll(
        self, uid: str, info: zds.WorkloadInfo, netns_path: str, *, timeout: float = 5.0
    ) -> None:
        """Hand the pod to ztunnel; returns once acked. Raises ZdsError (pod not enrolled)."""
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._cond:
                self._await_connection(timeout)
                self._exchange(zds.AddWorkload(uid, info), fd)
                previous = self._pods.pop(uid, None)
                self._pods[uid] = _Pod(info, fd)
        except BaseException:
            os.close(fd)
            raise
        if previous is not None:
            os.close(previous.netns_fd)

    def restore(self, uid: str, info: zds.WorkloadInfo, netns_path: str) -> None:
        """A pod enrolled before this agent started (a restarted agent), sent to ztunnel in
        the snapshot only: Istio's agent builds its snapshot of the mesh's pods before it
        serves ZDS (ConstructInitialSnapshot), so a ztunnel that reconnects keeps them."""
        if self._thread is not None:
            raise RuntimeError("restore() is for pods known before start()")
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        with self._cond:
            previous = self._pods.pop(uid, None)
            self._pods[uid] = _Pod(info, fd)
        if previous is not None:
            os.close(previous.netns_fd)

    def unenroll(self, uid: str) -> None:
        """Forget the pod and tell ztunnel if it is connected (else the next snapshot will)."""
        with self._cond:
            pod = self._pods.pop(uid, None)
            if pod is not None:
                os.close(pod.netns_fd)
            if self._conn is not None:
                self._exchange(zds.DelWorkload(uid), None)

    # ------------------------------------------------------------ internals (lock held)

    def _await_connection(self, timeout: float) -> None:
        if not self._cond.wait_for(lambda: self._conn is not None, timeout):
            raise ZtunnelNotConnectedError(
                f"no ztunnel connected to {self.socket_path} within {timeout} s"
            )

    def _exchange(self, request: zds.WorkloadRequest, fd: int | None) -> None:
        """Send one request and wait for its ack, on the current connection."""
        conn = self._conn
        if conn is None:
            raise ZtunnelNotConnectedError(f"no ztunnel connected to {self.socket_path}")
        try:
            zds.send_packet(conn, zds.encode_request(request), [] if fd is None else [fd])
            conn.settimeout(self.ack_timeout)
            reply, fds = zds.recv_packet(conn)
            for stray in fds:
                os.close(stray)
            if not reply:
                raise ConnectionResetError("ztunnel closed the connection")
            error = zds.decode_ack(reply)
        except (OSError, zds.ZdsDecodeError) as exc:
            self._drop_connection()
            raise ZdsError(f"{type(request).__name__}: ztunnel connection lost: {exc}") from exc
        if error:
            raise ZtunnelRejectedError(f"{type(request).__name__}: ztunnel says: {error}")

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send_snapshot(self) -> None:
        for uid, pod in self._pods.items():
            try:
                self._exchange(zds.AddWorkload(uid, pod.info), pod.netns_fd)
            except ZtunnelRejectedError as exc:
                log.warning("snapshot: pod %s rejected: %s", uid, exc)
        self._exchange(zds.SnapshotSent(), None)
        self.snapshots_sent += 1

    # ------------------------------------------------------------ background thread

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._stop.is_set():
                    log.exception("cni agent: accept failed")
                return
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        """Greet a (re)connected ztunnel: read its hello, replay the snapshot."""
        try:
            conn.settimeout(self.ack_timeout)
            hello, fds = zds.recv_packet(conn)
            for stray in fds:
                os.close(stray)
            version = zds.decode_hello(hello)
            if version != zds.ZDS_VERSION_V1:
                raise zds.ZdsDecodeError(f"unsupported zds version {version}")
        except (OSError, zds.ZdsDecodeError) as exc:
            log.warning("cni agent: bad hello from ztunnel: %s", exc)
            conn.close()
            return
        with self._cond:
            self._drop_connection()  # an older ztunnel instance is gone
            self._conn = conn
            try:
                self._send_snapshot()
            except ZdsError as exc:
                log.warning("cni agent: snapshot failed: %s", exc)
                return
            self._cond.notify_all()
