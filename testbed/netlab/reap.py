"""Ending every process that lives in a network namespace the testbed is about to delete.

A daemon started in a pod (`iperf3 -D`, `cmd &`, `setsid nohup cmd`) is in no manifest and
in no process group the testbed knows, yet it holds the namespace: once the name is gone
the namespace, its veths, routes and sockets stay in the kernel for as long as it runs.

Ownership is exact, never by name or pattern: a namespace is identified by the (st_dev,
st_ino) of its nsfs inode, read from a descriptor opened on the testbed's own mount at
/run/netns/<name>, and a process is in it when its /proc/<pid>/ns/net has that identity.
Signals go through a pidfd taken before the identity is checked again, so a pid reused in
between can never be signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

NetnsId = tuple[int, int]
"""(st_dev, st_ino) of a network namespace's nsfs inode."""


def netns_id_of_fd(fd: int) -> NetnsId:
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino)


def netns_id_of_pid(pid: int) -> NetnsId | None:
    """The network namespace of `pid`, or None if it has exited (or is a zombie)."""
    try:
        info = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


@contextmanager
def opened_netns(paths: Collection[str]) -> Iterator[dict[NetnsId, str]]:
    """Hold each namespace mounted at `paths` open for the body: identity -> path.

    Holding a descriptor keeps the namespace (and so its identity) alive while its
    processes are found and ended, even if its mount goes away meanwhile.
    """
    fds: list[int] = []
    found: dict[NetnsId, str] = {}
    try:
        for path in paths:
            if not os.path.ismount(path):
                continue  # never mounted (a crash mid-create) or deleted already
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            found[netns_id_of_fd(fd)] = path
        yield found
    finally:
        for fd in fds:
            os.close(fd)


def pids_in(netns: Collection[NetnsId]) -> dict[int, NetnsId]:
    """Every process on the machine whose network namespace is one of `netns`."""
    me = os.getpid()
    found: dict[int, NetnsId] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        ident = netns_id_of_pid(pid)
        if ident is not None and ident in netns:
            found[pid] = ident
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return "?"


def _signal_if_still_in(pid: int, netns: Collection[NetnsId], sig: int) -> bool:
    """Send `sig` to `pid` only if it is (still) in one of `netns`; True if sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # exited
    try:
        if netns_id_of_pid(pid) not in netns:
            return False  # exited, and the pid may now be another process's
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)
            return True
        return False
    finally:
        os.close(pidfd)


@dataclass
class Reaped:
    ended: list[str]
    survivors: list[str]
    pinned: set[str]
    """Paths of the namespaces a survivor still holds: deleting them would hide it."""


def end_processes_in(
    netns: dict[NetnsId, str], *, grace: float = 3.0, kill_wait: float = 5.0
) -> Reaped:
    """SIGTERM every process in `netns`, SIGKILL those still there after `grace` s.

    Processes that fork while being stopped are found by scanning again until none is
    left or `kill_wait` s after the SIGKILL; whoever is still there then is a survivor.
    """
    ended: dict[int, str] = {}

    def describe(pid: int, ident: NetnsId) -> str:
        return f"process {pid} ({_command(pid)}) in {os.path.basename(netns[ident])}"

    def signal_all(sig: int) -> dict[int, NetnsId]:
        """Signal the processes found now; SIGTERM only those not asked before."""
        live = pids_in(netns)
        for pid, ident in live.items():
            if sig == signal.SIGTERM and pid in ended:
                continue
            ended.setdefault(pid, describe(pid, ident))
            if _signal_if_still_in(pid, netns, sig) and sig == signal.SIGTERM:
                _signal_if_still_in(pid, netns, signal.SIGCONT)  # a stopped one must run
        return live

    if not netns or not signal_all(signal.SIGTERM):
        return Reaped([], [], set())
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and signal_all(signal.SIGTERM):
        time.sleep(0.05)
    deadline = time.monotonic() + kill_wait
    live = signal_all(signal.SIGKILL)
    while live and time.monotonic() < deadline:
        time.sleep(0.02)
        live = signal_all(signal.SIGKILL)
    return Reaped(
        ended=[text for pid, text in ended.items() if pid not in live],
        survivors=[describe(pid, ident) for pid, ident in live.items()],
        pinned={netns[ident] for ident in live.values()},
    )
