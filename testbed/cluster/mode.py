"""What a redirection mode must provide to the cluster (implemented in testbed.redirect).

The cluster is given a mode object, as Mininet is given its node classes; it never looks a
mode up itself, so nothing here depends on the modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from testbed.netlab.errors import TestbedError

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology


class ModeError(TestbedError):
    """An unknown mode or a bad mode option; the message names it and what was expected."""


class RedirectMode(Protocol):
    @property
    def name(self) -> str:
        """The mode's name, as the registry and every result row know it."""

    def install(self, cluster: Cluster) -> None:
        """After the network is built: start proxies and enroll the pods."""

    def enroll(self, pod: Pod) -> None:
        """Capture this pod's traffic."""

    def unenroll(self, pod: Pod) -> None:
        """Stop capturing this pod's traffic."""

    def facts(self) -> dict[str, str]:
        """Mode details and fallbacks that belong in every result row."""

    def proxy_pids(self) -> dict[str, int]:
        """Label -> pid of every proxy process the mode runs."""

    def update_policies(self, topology: Topology) -> None:
        """Apply the topology's current policies (after add_policy/remove_policy)."""

    def describe_pod(self, pod: Pod) -> str:
        """What the mode installed in a pod (rules), for the shell and inspect."""

    @property
    def captures_dns(self) -> bool:
        """Pods' DNS goes to their proxy (port 15053), else to the cluster DNS service."""
