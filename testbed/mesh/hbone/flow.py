"""HTTP/2 flow-control accounting (RFC 9113 section 5.2), pure and socket-free.

`ReceiveWindow` tracks what the peer may still send us and batches WINDOW_UPDATEs: credit is
returned only once `threshold` consumed bytes have accumulated, so a 1 MiB frame costs at most
one update per window instead of one per frame. `SendWindow` tracks what we may still send.
"""

from __future__ import annotations

from .frames import FLOW_CONTROL_ERROR, MAX_WINDOW_SIZE, PROTOCOL_ERROR, FrameError


class ReceiveWindow:
    def __init__(self, size: int, threshold: int) -> None:
        self.available = size
        self.threshold = threshold
        self._unacked = 0

    def receive(self, length: int) -> None:
        """The peer sent `length` flow-controlled bytes."""
        if length > self.available:
            raise FrameError(FLOW_CONTROL_ERROR, "peer overran the receive window")
        self.available -= length

    def consume(self, length: int) -> int:
        """`length` bytes left our buffers; returns the WINDOW_UPDATE increment to send (or 0)."""
        self._unacked += length
        if self._unacked < self.threshold:
            return 0
        increment, self._unacked = self._unacked, 0
        self.available += increment
        return increment


class SendWindow:
    def __init__(self, size: int) -> None:
        self.available = size

    def spend(self, length: int) -> None:
        self.available -= length

    def grow(self, increment: int) -> None:
        """Apply a WINDOW_UPDATE increment, or a SETTINGS_INITIAL_WINDOW_SIZE delta (may be < 0)."""
        if increment == 0:
            raise FrameError(PROTOCOL_ERROR, "WINDOW_UPDATE with a zero increment")
        if self.available + increment > MAX_WINDOW_SIZE:
            raise FrameError(FLOW_CONTROL_ERROR, "window grew beyond 2^31-1")
        self.available += increment
