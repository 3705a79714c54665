"""The cluster model (Topology, pods, services, policies) and its build into netlab."""

from typing import TYPE_CHECKING

from testbed.cluster.model import (
    LinkParams,
    NodeSpec,
    PodSpec,
    PolicyRule,
    PolicySpec,
    ServiceSpec,
    Topology,
    TopologyError,
    plan,
    service_endpoints,
)

if TYPE_CHECKING:  # imported on first use (below): the model alone stays light
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.loader import load_topology

__all__ = [
    "Cluster",
    "LinkParams",
    "NodeSpec",
    "Pod",
    "PodSpec",
    "PolicyRule",
    "PolicySpec",
    "ServiceSpec",
    "Topology",
    "TopologyError",
    "load_topology",
    "plan",
    "service_endpoints",
]


def __getattr__(name: str) -> object:
    # Cluster and the loader import netlab and topology files; the model stays light.
    if name in ("Cluster", "Pod"):
        from testbed.cluster import cluster

        return getattr(cluster, name)
    if name == "load_topology":
        from testbed.cluster.loader import load_topology

        return load_topology
    raise AttributeError(name)
