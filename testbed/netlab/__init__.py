"""Linux networking for the testbed: namespaces, links, processes, the run manifest.

Knows nothing of Kubernetes or Istio. The names below load their modules on first use, so
that importing one light module of this package (the error base, say) does not load
pyroute2.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.netlab.errors import TestbedError
    from testbed.netlab.lab import Lab, TeardownReport, clean_all, clean_run
    from testbed.netlab.manifest import ManifestError, RunManifest, list_runs
    from testbed.netlab.netns import Netns
    from testbed.netlab.process import ManagedProcess, NetlabError

_HOMES = {
    "Lab": "lab",
    "TeardownReport": "lab",
    "clean_all": "lab",
    "clean_run": "lab",
    "ManifestError": "manifest",
    "RunManifest": "manifest",
    "list_runs": "manifest",
    "Netns": "netns",
    "ManagedProcess": "process",
    "NetlabError": "process",
    "TestbedError": "errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "Lab",
    "ManagedProcess",
    "ManifestError",
    "NetlabError",
    "Netns",
    "RunManifest",
    "TeardownReport",
    "TestbedError",
    "clean_all",
    "clean_run",
    "list_runs",
]
