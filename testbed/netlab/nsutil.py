"""Low-level network-namespace calls (setns/unshare/mount) for the calling thread.

Python 3.11 has no os.setns, so libc is called through ctypes. Network namespaces are a
per-thread attribute in Linux: a thread may enter a namespace, create sockets there (they
stay bound to it) and come back, without forking. That makes building hundreds of
namespaces cheap.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_rundir_lock = threading.Lock()
_rundir_ready = False


def _check(result: int, what: str, target: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what} failed for {target}: {os.strerror(code)}")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace behind `fd`."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns", f"fd {fd}")


def _prepare_rundir() -> None:
    """Make /run/netns a shared mount point, exactly as `ip netns add` does, so that
    namespace mounts made here are seen by iproute2 and other mount namespaces."""
    global _rundir_ready
    with _rundir_lock:
        if _rundir_ready:
            return
        os.makedirs(NETNS_DIR, exist_ok=True)
        rundir = NETNS_DIR.encode()
        if _libc.mount(b"", rundir, b"none", _MS_SHARED | _MS_REC, None) != 0:
            _check(
                _libc.mount(rundir, rundir, b"none", _MS_BIND | _MS_REC, None), "bind", NETNS_DIR
            )
            _check(
                _libc.mount(b"", rundir, b"none", _MS_SHARED | _MS_REC, None), "share", NETNS_DIR
            )
        _rundir_ready = True


def create_netns(name: str) -> None:
    """Create a named network namespace at /run/netns/<name> (like `ip netns add`).

    A short-lived thread unshares its own network namespace and bind-mounts it; the
    caller's threads never leave their namespace.
    """
    _prepare_rundir()
    path = netns_path(name)
    errors: list[BaseException] = []

    def unshare_and_bind() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
            os.close(fd)
            _check(_libc.unshare(CLONE_NEWNET), "unshare", name)
            src = b"/proc/thread-self/ns/net"
            _check(_libc.mount(src, path.encode(), b"none", _MS_BIND, None), "mount", path)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=unshare_and_bind, name=f"netns-create-{name}")
    worker.start()
    worker.join()
    if errors:
        if os.path.exists(path) and not os.path.ismount(path):
            os.unlink(path)
        raise errors[0]


def delete_netns(name: str) -> bool:
    """Unmount and remove /run/netns/<name>; returns False if it did not exist.

    The kernel frees the namespace (and the veth ends inside it) once no process
    holds it any more.
    """
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise OSError(code, f"umount {path}: {os.strerror(code)}")
    os.unlink(path)
    return True


def netns_exists(name: str) -> bool:
    return os.path.ismount(netns_path(name))


@contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body with the calling thread inside the namespace at `path`."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            setns_fd(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def unmount(path: str) -> bool:
    """Lazily unmount a mount point the testbed made (a bpffs, say)."""
    if not os.path.ismount(path):
        return False
    _check(_libc.umount2(path.encode(), _MNT_DETACH), "umount", path)
    return True
