"""Keep the data path's 1 MiB buffers in the heap (glibc only; a no-op elsewhere).

By default glibc serves allocations above 128 KiB-32 MiB (adaptive) with fresh mmap()s and
trims the heap eagerly, so every decrypted 1 MiB batch page-faults its memory in again:
measured ~15% of an HBONE proxy's CPU. Raising the mmap and trim thresholds makes freed
buffers get reused instead. Process-wide and idempotent; HboneServer and HboneClient call it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools

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


class BufferRecycler:
    """Decrypt buffers, reused once every transport that was handed views of one has sent them.

    uvloop keeps references to written memoryviews until the bytes reach the kernel, so a
    buffer may only be overwritten after each such transport's write buffer is empty.
    Allocating instead costs a 1 MiB memset (and page faults) per batch.
    """

    def __init__(self, size: int, keep: int = 4) -> None:
        self.size = size
        self._keep = keep
        self._free: list[bytearray] = []
        self._lent: list[tuple[bytearray, list[asyncio.WriteTransport]]] = []

    def take(self, needed: int) -> bytearray:
        if needed > self.size:
            return bytearray(needed)  # rare (a huge backlog): not pooled
        if self._lent:
            self._reclaim()
        return self._free.pop() if self._free else bytearray(self.size)

    def lend(self, buffer: bytearray, writers: list[asyncio.WriteTransport]) -> None:
        """`buffer` was sliced into writes on `writers` (none: it is free again)."""
        if len(buffer) != self.size:
            return
        if writers:
            self._lent.append((buffer, writers))
        elif len(self._free) < self._keep:
            self._free.append(buffer)

    def _reclaim(self) -> None:
        still_lent = []
        for buffer, writers in self._lent:
            if any(writer.get_write_buffer_size() for writer in writers):
                still_lent.append((buffer, writers))
            elif len(self._free) < self._keep:
                self._free.append(buffer)
        self._lent = still_lent
