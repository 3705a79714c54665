"""Redirection modes: how pod traffic reaches the mesh proxies.

Each mode is a class with the RedirectMode methods (testbed.cluster.mode); `create_mode`
makes one by name. A mode joins by adding itself to MODES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from testbed.cluster.mode import RedirectMode
from testbed.redirect.ebpf import EbpfMode
from testbed.redirect.inpod import InPodMode
from testbed.redirect.legacy import LegacyMode
from testbed.redirect.none import NoMesh
from testbed.redirect.sidecar import SidecarMode


class ModeError(Exception):
    """An unknown mode or a bad mode option."""


MODES: dict[str, Callable[[dict[str, Any]], RedirectMode]] = {
    "none": NoMesh.from_options,
    "inpod": InPodMode.from_options,
    "legacy": LegacyMode.from_options,
    "sidecar": SidecarMode.from_options,
    "ebpf": EbpfMode.from_options,
}


def available_modes() -> list[str]:
    return list(MODES)


def create_mode(name: str, options: dict[str, Any] | None = None) -> RedirectMode:
    factory = MODES.get(name)
    if factory is None:
        raise ModeError(f"unknown mode {name!r}; available: {', '.join(MODES)}")
    return factory(options or {})
