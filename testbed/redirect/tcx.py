"""tcx attachment (kernel 6.6+) through the bpf(2) syscall, for kernels where it exists.

tc (iproute2 6.1) and bpftool 7.1 cannot make tcx links, so the three commands needed are
issued here with ctypes: BPF_OBJ_GET opens a pinned program, BPF_LINK_CREATE attaches it
to a device's tcx ingress or egress in the calling thread's network namespace, and
BPF_OBJ_PIN pins the link into the run's bpffs. The pinned link keeps the program
attached after this process exits; unlinking the pin detaches it, and so does deleting the
device. BPF_PROG_QUERY lists what is attached to a hook.

The bpf_attr layouts are packed by pure functions (tested without BPF).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path
from typing import Literal

from testbed.netlab.errors import TestbedError

Direction = Literal["ingress", "egress"]

BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_QUERY, BPF_LINK_CREATE = 6, 7, 16, 28
ATTACH_TYPES: dict[Direction, int] = {"ingress": 46, "egress": 47}  # BPF_TCX_INGRESS/EGRESS
_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}
_ATTR_SIZE = 128  # larger than every layout used; the kernel checks the tail is zero
QUERY_CAPACITY = 64

_libc = ctypes.CDLL(None, use_errno=True)


class TcxError(TestbedError, OSError):
    """A bpf(2) call for tcx failed (errno and what was attempted)."""


def obj_attr(path: Path, fd: int = 0) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """bpf_attr for BPF_OBJ_GET/BPF_OBJ_PIN: pathname pointer, bpf_fd, file_flags."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return struct.pack("=QII", ctypes.addressof(name), fd, 0), name


def link_create_attr(prog_fd: int, ifindex: int, direction: Direction) -> bytes:
    """bpf_attr.link_create: prog_fd, target_ifindex, attach_type, flags (tcx: append)."""
    return struct.pack("=IIII", prog_fd, ifindex, ATTACH_TYPES[direction], 0)


def query_attr(ifindex: int, direction: Direction, ids_address: int, capacity: int) -> bytes:
    """bpf_attr.query: target_ifindex, attach_type, query_flags, attach_flags, prog_ids,
    prog_cnt (in: capacity, out: count)."""
    return struct.pack("=IIIIQI", ifindex, ATTACH_TYPES[direction], 0, 0, ids_address, capacity)


def _bpf(cmd: int, attr: bytes, what: str) -> tuple[int, ctypes.Array[ctypes.c_char]]:
    number = _SYSCALL_BPF.get(platform.machine())
    if number is None:
        raise TcxError(0, f"bpf(2) number unknown on {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), buffer, _ATTR_SIZE)
    if result < 0:
        code = ctypes.get_errno()
        raise TcxError(code, f"{what}: {os.strerror(code)}")
    return int(result), buffer


def open_pinned(path: Path) -> int:
    attr, _keep = obj_attr(path)
    return _bpf(BPF_OBJ_GET, attr, f"opening {path}")[0]


def attach_link(program: Path, ifindex: int, direction: Direction, link_pin: Path) -> None:
    """Attach a pinned program to tcx `direction` of `ifindex` (in the calling thread's
    namespace) and pin the link at `link_pin`."""
    prog_fd = open_pinned(program)
    try:
        what = f"attaching {program.name} to ifindex {ifindex} tcx {direction}"
        link_fd = _bpf(BPF_LINK_CREATE, link_create_attr(prog_fd, ifindex, direction), what)[0]
    finally:
        os.close(prog_fd)
    try:
        attr, _keep = obj_attr(link_pin, link_fd)
        _bpf(BPF_OBJ_PIN, attr, f"pinning the link at {link_pin}")
    finally:
        os.close(link_fd)


def attached_ids(ifindex: int, direction: Direction) -> list[int]:
    """Ids of the programs attached to a tcx hook of `ifindex` (calling thread's netns)."""
    ids = (ctypes.c_uint32 * QUERY_CAPACITY)()
    attr = query_attr(ifindex, direction, ctypes.addressof(ids), QUERY_CAPACITY)
    _, buffer = _bpf(BPF_PROG_QUERY, attr, f"querying ifindex {ifindex} tcx {direction}")
    (count,) = struct.unpack_from("=I", buffer.raw, 24)
    return list(ids[: min(count, QUERY_CAPACITY)])


def supported(ifindex: int) -> bool:
    """Whether this kernel has tcx: querying a hook works (EINVAL on older kernels)."""
    try:
        attached_ids(ifindex, "ingress")
    except TcxError:
        return False
    return True
