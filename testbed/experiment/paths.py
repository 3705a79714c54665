"""Putting a cluster on one data path (direct, capture, hbone, waypoint) between cases.

All of a mode's paths run on the cluster of that mode, switched with what the mode already
offers: `mode.enroll`/`mode.unenroll` of the server pods (Istio's
`istio.io/dataplane-mode: none` on the destination: the client's proxy then passes TCP
through without TLS), and a waypoint attached to or detached from the destination service
by its `istio.io/use-waypoint` label followed by `mode.update_policies(topology)`.

A waypoint cannot be added to a running cluster (its pod and identity come from the
topology), so a mode that runs the `waypoint` path is built from a variant of the topology
(`waypoint_variant`): one waypoint pod (on a node without the client, where there is one)
and, per server pod, a service whose only endpoint is that pod (so that a placement keeps
its meaning through the waypoint). The variant is named in the rows' facts. The waypoint
idles while not attached.

`set_path` is the one place that touches the mode; the runner reaches it through
`ClusterPaths` (its `paths` parameter, which tests replace with a fake).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from testbed.cluster.loader import load_topology
from testbed.cluster.model import Topology
from testbed.cluster.waypoints import USE_WAYPOINT

WAYPOINT_NAME = "exp-waypoint"
TARGET_LABEL = "testbed.experiment/target"
# Every port a workload serves on: iperf3, rr, HTTP echo, sockperf.
WORKLOAD_PORTS = [5201, 7777, 8080, 11111]


def target_service(pod_name: str) -> str:
    """The variant's service in front of one server pod."""
    return f"{pod_name}-direct"


def waypoint_variant(topology: Topology) -> Topology:
    """`topology` whose build() also adds the waypoint and one service per server pod."""
    base_build = topology.build

    def build() -> None:
        base_build()
        add_waypoint_parts(topology)

    topology.build = build  # type: ignore[method-assign]
    return topology


def add_waypoint_parts(topology: Topology) -> None:
    clients = [p for p in topology.pods.values() if p.labels.get("role") == "client"]
    servers = [p for p in topology.pods.values() if p.labels.get("role") == "server"]
    if not clients or not servers:
        raise topology.error("the waypoint path needs role=client and role=server pods")
    topology.add_waypoint(WAYPOINT_NAME, waypoint_node(topology), namespace=servers[0].namespace)
    for pod in servers:
        pod.labels[TARGET_LABEL] = pod.name
        topology.add_service(
            target_service(pod.name),
            selector={TARGET_LABEL: pod.name},
            ports=list(WORKLOAD_PORTS),
            namespace=pod.namespace,
        )


def waypoint_node(topology: Topology) -> str:
    """The last node without a client pod, else the client's: the waypoint never shares
    the client's node when it need not (Istio places it as any Deployment; mode legacy's
    ztunnel takes HBONE to a pod of its own node for itself, the waypoint's included)."""
    client_nodes = {p.node for p in topology.pods.values() if p.labels.get("role") == "client"}
    free = [node for node in topology.nodes if node not in client_nodes]
    return free[-1] if free else next(iter(client_nodes))


def variant_facts(topology: Topology) -> dict[str, str]:
    """What the rows say about the variant (empty for the topology as written)."""
    spec = topology.l7.waypoints.get(_waypoint_key(topology))
    if spec is None:
        return {}
    return {
        "topology_variant": f"+waypoint {WAYPOINT_NAME} on {spec.node}, +a service per server",
        "waypoint_attach": "istio.io/use-waypoint on the service, pushed at run time",
    }


def _waypoint_key(topology: Topology) -> str:
    for key, spec in topology.l7.waypoints.items():
        if spec.name == WAYPOINT_NAME:
            return key
    return ""


class ServiceTarget:
    """A server pod as the workloads see it, addressed through its variant service's VIP."""

    def __init__(self, pod: Any, vip: str) -> None:
        self._pod = pod
        self.ip = vip

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pod, name)


def set_path(cluster: Any, path: str, servers: Sequence[Any]) -> None:
    """Put `cluster` (a running testbed.cluster Cluster) on `path` for these server pods.

    direct: nothing (mode none). capture: waypoint detached, servers unenrolled. hbone:
    servers enrolled, waypoint detached. waypoint: servers enrolled, waypoint attached to
    each server's service. Every step returns once the proxies run with it."""
    if path == "direct":
        return
    mode, topology = cluster.mode, cluster.topology
    attach = path == "waypoint"
    if attach and not _waypoint_key(topology):
        raise RuntimeError("the waypoint path needs the cluster built from waypoint_variant()")
    changed = _label_services(topology, servers, attach)
    if changed and not attach:
        mode.update_policies(topology)
    for server in servers:
        if path == "capture":
            mode.unenroll(server)
        else:
            mode.enroll(server)
    if changed and attach:
        mode.update_policies(topology)


def _label_services(topology: Topology, servers: Sequence[Any], attach: bool) -> bool:
    """Set or clear istio.io/use-waypoint on the servers' variant services; whether any
    label changed."""
    changed = False
    for server in servers:
        service = topology.services.get(target_service(server.name))
        if service is None:
            continue
        if attach and service.labels.get(USE_WAYPOINT) != WAYPOINT_NAME:
            service.labels[USE_WAYPOINT] = WAYPOINT_NAME
            changed = True
        elif not attach and USE_WAYPOINT in service.labels:
            del service.labels[USE_WAYPOINT]
            changed = True
    return changed


def destination(cluster: Any, path: str, server: Any) -> Any:
    """The server as the workload addresses it: its pod IP, or on the waypoint path its
    service VIP (waypoints serve service traffic, Istio's default)."""
    if path != "waypoint":
        return server
    return ServiceTarget(server, cluster.topology.services[target_service(server.name)].vip)


class ClusterPaths:
    """The runner's PathControl over a real Cluster."""

    def topology(self, topology: str, paths: Sequence[str]) -> str | Topology:
        """The spec's topology, or its waypoint variant for a mode with the waypoint path."""
        return waypoint_variant(load_topology(topology)) if "waypoint" in paths else topology

    def facts(self, cluster: Any) -> dict[str, str]:
        """The variant's facts (the mode starts its waypoint and samples it as a proxy)."""
        return variant_facts(cluster.topology)

    def switch(self, cluster: Any, path: str, servers: Sequence[Any]) -> None:
        set_path(cluster, path, servers)

    def destination(self, cluster: Any, path: str, server: Any) -> Any:
        return destination(cluster, path, server)
