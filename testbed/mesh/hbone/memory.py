"""The decrypt buffer pool, and keeping 1 MiB buffers in the heap (glibc only).

By default glibc serves allocations above 128 KiB-32 MiB (adaptive) with fresh mmap()s and
trims the heap eagerly, so every decrypted 1 MiB batch page-faults its memory in again:
measured ~15% of an HBONE proxy's CPU. Raising the mmap and trim thresholds makes freed
buffers get reused instead. Process-wide and idempotent; HboneServer and HboneClient call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Protocol

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum for this setting on 64-bit
_TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_buffers_in_heap() -> bool:
    """Returns whether the allocator was tuned."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


class Drain(Protocol):
    """A writer that was handed views of a pool buffer (a stream's socket transport)."""

    def sent_total(self) -> int:
        """How many of the bytes written to it so far have left its write buffer."""
        ...


class BufferPool:
    """Decrypt buffers, each reused once every writer handed views of it has sent them.

    A transport keeps the memoryviews written to it until the bytes reach the kernel, so a
    buffer may only be overwritten after each such writer's sent total passed the mark it had
    when the buffer was lent; a writer still busy with later bytes does not hold it back.
    Allocating instead costs a zeroed 1 MiB (memset and page faults) per batch.
    """

    def __init__(self, size: int, keep: int = 8) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lent: list[tuple[bytearray, list[tuple[Drain, int]]]] = []
        self.allocated = 0  # buffers made so far: stays small while the pool does its job

    @property
    def lent(self) -> int:
        return len(self._lent)

    def take(self, needed: int) -> bytearray:
        if needed > self.size:
            return bytearray(needed)  # rare (a huge backlog): not pooled
        if self._lent:
            self._reclaim()
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return bytearray(self.size)

    def lend(self, buffer: bytearray, marks: list[tuple[Drain, int]]) -> None:
        """`buffer` went out as views: free once each `writer.sent_total() >= mark`."""
        if len(buffer) != self.size:
            return
        if marks:
            self._lent.append((buffer, marks))
        elif len(self._free) < self._keep:
            self._free.append(buffer)

    def _reclaim(self) -> None:
        still_lent = []
        for buffer, marks in self._lent:
            if any(writer.sent_total() < mark for writer, mark in marks):
                still_lent.append((buffer, marks))
            elif len(self._free) < self._keep:
                self._free.append(buffer)
        self._lent = still_lent
