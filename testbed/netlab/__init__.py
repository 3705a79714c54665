"""Linux networking for the testbed: namespaces, links, processes, the run manifest.

Knows nothing of Kubernetes or Istio.
"""

from testbed.netlab.lab import Lab, TeardownReport, clean_all, clean_run
from testbed.netlab.manifest import ManifestError, RunManifest, list_runs
from testbed.netlab.netns import Netns
from testbed.netlab.process import ManagedProcess, NetlabError

__all__ = [
    "Lab",
    "ManagedProcess",
    "ManifestError",
    "NetlabError",
    "Netns",
    "RunManifest",
    "TeardownReport",
    "clean_all",
    "clean_run",
    "list_runs",
]
