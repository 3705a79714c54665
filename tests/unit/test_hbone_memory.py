"""Decrypt buffer recycling and the allocator tuning (pure, no sockets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from testbed.mesh.hbone.memory import BufferRecycler, keep_buffers_in_heap


@dataclass
class FakeTransport:
    pending: int = 0

    def get_write_buffer_size(self) -> int:
        return self.pending


def test_a_buffer_comes_back_only_after_its_writers_flushed() -> None:
    recycler = BufferRecycler(1024)
    first = recycler.take(100)
    writer = FakeTransport(pending=50)
    recycler.lend(first, [cast(Any, writer)])
    second = recycler.take(100)
    assert second is not first  # views of `first` are still queued in the transport
    recycler.lend(second, [])
    writer.pending = 0
    assert recycler.take(100) in (first, second)
    assert recycler.take(100) in (first, second)


def test_oversized_requests_are_not_pooled() -> None:
    recycler = BufferRecycler(1024)
    big = recycler.take(4096)
    assert len(big) == 4096
    recycler.lend(big, [])
    assert len(recycler.take(10)) == 1024


def test_allocator_tuning_is_idempotent() -> None:
    assert keep_buffers_in_heap() == keep_buffers_in_heap()
