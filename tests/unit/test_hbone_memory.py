"""The decrypt buffer pool and the allocator tuning (pure, no sockets)."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from testbed.mesh.hbone.memory import BufferPool, keep_buffers_in_heap


@dataclass
class FakeWriter:
    """A transport that has sent `sent` of the bytes written to it."""

    sent: int = 0

    def sent_total(self) -> int:
        return self.sent


def test_a_buffer_comes_back_once_its_writers_sent_past_their_marks() -> None:
    pool = BufferPool(1024)
    first = pool.take(100)
    writer = FakeWriter(sent=0)
    pool.lend(first, [(writer, 50)])
    second = pool.take(100)
    assert second is not first  # views of `first` are still queued in the transport
    pool.lend(second, [])
    writer.sent = 50  # the writer is still busy, but with bytes after the mark
    assert {id(pool.take(100)), id(pool.take(100))} == {id(first), id(second)}
    assert pool.allocated == 2


def test_a_slow_writer_holds_only_the_buffers_it_has_views_of() -> None:
    pool = BufferPool(1024)
    stalled, busy = FakeWriter(), FakeWriter()
    held = pool.take(10)
    pool.lend(held, [(stalled, 10), (busy, 10)])
    for mark in range(20, 220, 10):  # 20 more batches for the busy writer only
        buffer = pool.take(10)
        assert buffer is not held
        pool.lend(buffer, [(busy, mark)])
        busy.sent = mark  # it keeps up
    assert pool.take(10) is not held
    assert pool.allocated == 2  # one pinned by the stalled writer, one cycling
    assert pool.lent == 1
    stalled.sent = 10
    pool.take(10)
    assert pool.lent == 0


def test_oversized_requests_are_not_pooled() -> None:
    pool = BufferPool(1024)
    big = pool.take(4096)
    assert len(big) == 4096
    pool.lend(big, [])
    assert len(pool.take(10)) == 1024
    assert pool.allocated == 1


def test_allocator_is_tuned_on_glibc() -> None:
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert keep_buffers_in_heap() is on_glibc
