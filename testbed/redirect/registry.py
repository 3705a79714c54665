"""The registry of redirection modes: the one list of them.

A mode is a module with a `Mode` subclass (testbed.redirect.base) and one entry here; the
CLI's `--mode`, experiment specs and the conformance suite all read this dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from testbed.cluster.mode import ModeError
from testbed.redirect.base import Mode
from testbed.redirect.ebpf import EbpfMode
from testbed.redirect.inpod import InPodMode
from testbed.redirect.istio_ztunnel import ENV_VARIABLE
from testbed.redirect.legacy import LegacyMode
from testbed.redirect.none import NoMesh
from testbed.redirect.sidecar import SidecarMode

MODES: dict[str, type[Mode]] = {
    "none": NoMesh,
    "sidecar": SidecarMode,
    "inpod": InPodMode,
    "legacy": LegacyMode,
    "ebpf": EbpfMode,
}


# A mode label of the bench and experiments: the mode with Istio's ztunnel (TESTBED_ZTUNNEL).
ISTIO_ZTUNNEL_SUFFIX = "+istio-ztunnel"


def available_modes() -> list[str]:
    return list(MODES)


def mode_class(name: str) -> type[Mode]:
    found = MODES.get(name)
    if found is None:
        raise ModeError(f"unknown mode {name!r}; available: {', '.join(MODES)}")
    return found


def create_mode(name: str, options: Mapping[str, Any] | None = None) -> Mode:
    """The mode `name` with its options validated (ModeError names a bad one)."""
    return mode_class(name).from_options(options or {})


def create_labelled_mode(label: str) -> Mode:
    """A bench/experiment mode label: a mode name, or `inpod+istio-ztunnel` (inpod with
    Istio's ztunnel on every node, the binary named by TESTBED_ZTUNNEL)."""
    name, suffix, rest = label.partition(ISTIO_ZTUNNEL_SUFFIX)
    if not suffix:
        return create_mode(label)
    if name != "inpod" or rest:
        raise ModeError(
            f"mode label {label!r}: only inpod{ISTIO_ZTUNNEL_SUFFIX} runs Istio's ztunnel"
        )
    binary = os.environ.get(ENV_VARIABLE, "")
    if not binary:
        raise ModeError(f"mode label {label!r}: set {ENV_VARIABLE} to Istio's ztunnel binary")
    return create_mode(name, {"ztunnel": binary})
