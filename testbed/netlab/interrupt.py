"""Ctrl-C and SIGTERM that cannot be lost.

Python runs a signal handler between the bytecodes of whatever is running. If that happens
inside a finalizer (pyroute2 closes an event loop in `__del__`), the KeyboardInterrupt it
raises is printed and dropped, and a build would carry on. So the handler also sets a flag,
and each build step checks it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested = threading.Event()


def _handle(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    raise KeyboardInterrupt(f"signal {signum}")


def install() -> None:
    """Make SIGINT and SIGTERM interrupt the process (and be remembered)."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt("interrupted")
