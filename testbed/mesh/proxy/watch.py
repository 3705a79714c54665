"""Config reload for the proxies: poll a file, load it again when it changed, keep the
previous version when the new one is invalid (a proxy never runs half a config)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from testbed.mesh.config import ReloadCheck

INTERVAL = 0.5
T = TypeVar("T")


@dataclass(frozen=True)
class Watched(Generic[T]):
    """A config file, how to load it, and who takes each new valid version."""

    path: Path
    load: Callable[[Path], T]
    on_change: Callable[[T], None]


async def watch(watched: Watched[T], interval: float = INTERVAL) -> None:
    """Poll until cancelled."""
    check = ReloadCheck(watched.path, watched.load, watched.on_change)
    while True:
        await asyncio.sleep(interval)
        check.poll()
