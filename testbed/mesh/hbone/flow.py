"""HTTP/2 flow-control accounting (RFC 9113 section 5.2), pure and socket-free.

`ReceiveWindow` is the connection's receive window: credit is returned as bytes arrive, in
batches of `threshold`, so a 1 MiB frame costs at most one WINDOW_UPDATE. `StreamReceiver` is a
stream's: it credits bytes back as soon as they arrive (the sender never waits for the app to
read) while the bytes held for a slow app stay under `buffer_limit`; past that, credit waits
for `consume`. So a stream holds at most `window + buffer_limit` bytes, and it never stalls
while the app keeps reading. `SendWindow` tracks what we may still send.
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


class StreamReceiver:
    """One stream's receive window with early credit and a bound on buffered bytes."""

    def __init__(self, window: int, buffer_limit: int, threshold: int) -> None:
        if not 0 < threshold <= window:
            raise ValueError("the credit threshold must be within the window")
        self.window = window
        self.buffer_limit = buffer_limit
        self.threshold = threshold
        self.received = 0  # flow-controlled bytes the peer sent (padding included)
        self.consumed = 0  # of those, how many left our buffers
        self.granted = window  # what the peer may send in total: window + increments

    @property
    def available(self) -> int:
        """What the peer may still send before it must wait for a WINDOW_UPDATE."""
        return self.granted - self.received

    @property
    def buffered(self) -> int:
        return self.received - self.consumed

    def receive(self, length: int) -> None:
        if length > self.available:
            raise FrameError(FLOW_CONTROL_ERROR, "peer overran the stream window")
        self.received += length

    def consume(self, length: int) -> None:
        if length > self.buffered:
            raise ValueError(f"consumed {length} bytes but only {self.buffered} are buffered")
        self.consumed += length

    def credit(self) -> int:
        """The WINDOW_UPDATE increment due now (0: none yet, below the batching threshold)."""
        target = min(self.received, self.consumed + self.buffer_limit) + self.window
        increment = target - self.granted
        if increment < self.threshold:
            return 0
        self.granted = target
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
