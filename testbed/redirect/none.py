"""Mode `none`: no mesh, pods talk directly (the baseline every mode is compared to)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology


class NoMesh:
    name = "none"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> NoMesh:
        if options:
            from testbed.redirect import ModeError

            raise ModeError(f"mode none takes no options, got {sorted(options)}")
        return cls()

    def install(self, cluster: Cluster) -> None:
        pass

    def enroll(self, pod: Pod) -> None:
        pass

    def unenroll(self, pod: Pod) -> None:
        pass

    def update_policies(self, topology: Topology) -> None:
        """Without a mesh nothing enforces AuthorizationPolicies, as in Kubernetes."""

    def facts(self) -> dict[str, str]:
        return {}

    def proxy_pids(self) -> dict[str, int]:
        return {}

    def describe_pod(self, pod: Pod) -> str:
        return "mode none: no redirection rules"
