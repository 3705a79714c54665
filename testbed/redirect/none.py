"""Mode `none`: no mesh, pods talk directly (the baseline every mode is compared to).

Without a mesh nothing enforces AuthorizationPolicies, as in Kubernetes. No options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.redirect.base import Mode

if TYPE_CHECKING:
    from testbed.cluster.cluster import Pod


class NoMesh(Mode):
    name = "none"

    def describe_pod(self, pod: Pod) -> str:
        return "mode none: no redirection rules"
