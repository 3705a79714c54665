"""Waypoints in topology scripts: declarations, Istio's attachment labels, and what follows
from them (waypoint fields in the mesh config, each waypoint's L7 file, its process).

A waypoint is a pod of its own (service account = its name, never captured) running
`python -m testbed.mesh.waypoint`. Istio's labels decide who uses it:

- `istio.io/use-waypoint: <name>` on a namespace, a service or a pod; the object's own
  label wins over its namespace's, and `none` opts it out. The waypoint is looked up in the
  object's namespace, or in `istio.io/use-waypoint-namespace` when that is set.
- `istio.io/waypoint-for` on the waypoint: `service` (the default: traffic to service VIPs),
  `workload` (traffic to pod IPs), `all`, or `none`.

Routes (HTTPRoute-like) attach to services by name; L7 policies target services by name,
or, with none named, everything the waypoints of their namespace serve.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import ValidationError

from testbed.mesh.ca import CertificateAuthority, Identity
from testbed.mesh.config import GatewayAddress, LocalConfig, NetworkAddress, Service, Workload
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.l7authz import L7Policy
from testbed.mesh.waypoint.routing import HttpRoute
from testbed.netlab import ManagedProcess

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
DATAPLANE_MODE = "istio.io/dataplane-mode"
OPT_OUT = "none"
WaypointFor = Literal["service", "workload", "all", "none"]
Kind = Literal["service", "workload"]


class WaypointError(ValueError):
    """A waypoint declaration, route or L7 policy is wrong (the caller names the topology)."""


@dataclass(frozen=True)
class WaypointSpec:
    name: str
    namespace: str
    node: str
    waypoint_for: WaypointFor = "service"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def serves(self, kind: Kind) -> bool:
        return self.waypoint_for in (kind, "all")


@dataclass
class L7Declarations:
    """What a topology declared beyond L4: waypoints, namespace labels, routes, policies."""

    waypoints: dict[str, WaypointSpec] = field(default_factory=dict)  # by "<ns>/<name>"
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    routes: list[HttpRoute] = field(default_factory=list)
    policies: list[L7Policy] = field(default_factory=list)

    def waypoint_labels(self, spec: WaypointSpec) -> dict[str, str]:
        """The waypoint pod's labels: out of the mesh's capture, named as a Gateway's pod."""
        return {DATAPLANE_MODE: OPT_OUT, GATEWAY_NAME: spec.name, WAYPOINT_FOR: spec.waypoint_for}

    def add_waypoint(self, spec: WaypointSpec) -> None:
        if spec.waypoint_for not in get_args(WaypointFor):
            raise WaypointError(
                f"waypoint {spec.name!r}: waypoint_for {spec.waypoint_for!r} is not one of "
                f"{list(get_args(WaypointFor))}"
            )
        if spec.key in self.waypoints:
            raise WaypointError(f"duplicate waypoint {spec.key!r}")
        self.waypoints[spec.key] = spec

    def add_route(
        self, name: str, namespace: str, parents: list[str], rules: Sequence[Mapping[str, Any]]
    ) -> None:
        data = {"name": name, "namespace": namespace, "parents": parents, "rules": list(rules)}
        self.routes.append(_validated(HttpRoute, data, f"route {name!r}"))

    def add_policy(self, data: dict[str, Any]) -> None:
        self.policies.append(_validated(L7Policy, data, f"L7 policy {data.get('name')!r}"))

    # -- attachment -------------------------------------------------------------------------
    def waypoint_for(
        self, labels: Mapping[str, str], namespace: str, kind: Kind
    ) -> WaypointSpec | None:
        """The waypoint an object with `labels` in `namespace` uses for `kind` traffic."""
        namespace_labels = self.namespace_labels.get(namespace, {})
        own = USE_WAYPOINT in labels
        name = labels[USE_WAYPOINT] if own else namespace_labels.get(USE_WAYPOINT)
        if not name or name == OPT_OUT:
            return None
        source = labels if own else namespace_labels
        key = f"{source.get(USE_WAYPOINT_NAMESPACE, namespace)}/{name}"
        spec = self.waypoints.get(key)
        if spec is None:
            raise WaypointError(f"{USE_WAYPOINT}={name!r} in {namespace!r}: no waypoint {key!r}")
        return spec if spec.serves(kind) else None


def _validated(model: Any, data: dict[str, Any], what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise WaypointError(f"{what}: {problems}") from None


def gateway_address(waypoint_ip: str) -> GatewayAddress:
    return GatewayAddress(destination=NetworkAddress.parse(f"/{waypoint_ip}"))


@dataclass(frozen=True)
class ObjectLabels:
    """What attachment looks at for one workload or service of the mesh config."""

    labels: Mapping[str, str]
    namespace: str
    is_waypoint: bool = False


def attach(
    config: LocalConfig,
    decls: L7Declarations,
    workloads: Mapping[str, ObjectLabels],
    services: Mapping[str, ObjectLabels],
    waypoint_ips: Mapping[str, str],
) -> LocalConfig:
    """`config` with the `waypoint` of every workload (by uid) and service (by
    "<ns>/<hostname>") that uses one; `waypoint_ips` maps waypoint keys to pod IPs."""

    def address(labels: ObjectLabels | None, kind: Kind) -> GatewayAddress | None:
        if labels is None or labels.is_waypoint:
            return None
        spec = decls.waypoint_for(labels.labels, labels.namespace, kind)
        return None if spec is None else gateway_address(waypoint_ips[spec.key])

    new_workloads: list[Workload] = [
        w.model_copy(update={"waypoint": address(workloads.get(w.uid), "workload")})
        for w in config.workloads
    ]
    new_services: list[Service] = [
        s.model_copy(update={"waypoint": address(services.get(s.key), "service")})
        for s in config.services
    ]
    return LocalConfig(workloads=new_workloads, services=new_services, policies=config.policies)


def l7_config_for(spec: WaypointSpec, config: LocalConfig, decls: L7Declarations) -> WaypointConfig:
    """The routes and policies one waypoint needs: those of the services it serves."""
    waypoint_ip = _waypoint_ip(spec, config)
    served = {
        s.key
        for s in config.services
        if s.waypoint is not None and config.waypoint_for_service(s) == (waypoint_ip, 15008)
    }
    routes = [r for r in decls.routes if served.intersection(r.parents)]
    policies = [
        p
        for p in decls.policies
        if served.intersection(p.targets) or (not p.targets and p.namespace == spec.namespace)
    ]
    return WaypointConfig(routes=routes, policies=policies)


def _waypoint_ip(spec: WaypointSpec, config: LocalConfig) -> str:
    for workload in config.workloads:
        if workload.namespace == spec.namespace and workload.name == spec.name:
            return str(workload.workload_ips[0])
    raise WaypointError(f"waypoint {spec.key} has no pod in the mesh config")


def write_l7_config(path: Path, config: WaypointConfig) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(config.dump_yaml(), encoding="utf-8")
    partial.replace(path)


# ---------------------------------------------------------------- a topology's waypoints


def declare_waypoint(
    topology: Topology, name: str, node: str, namespace: str, waypoint_for: str
) -> str:
    """A waypoint pod (service account = its name) and its declaration."""
    spec = WaypointSpec(name, namespace, node, waypoint_for)  # type: ignore[arg-type]
    try:
        topology.l7.add_waypoint(spec)
    except WaypointError as exc:
        raise topology.error(str(exc)) from None
    labels = topology.l7.waypoint_labels(spec)
    return topology.add_pod(name, node, namespace=namespace, service_account=name, labels=labels)


def _service_key(topology: Topology, name: str, what: str) -> str:
    service = topology.services.get(name)
    if service is None:
        known = ", ".join(topology.services) or "none declared yet"
        raise topology.error(f"{what}: unknown service {name!r} (services: {known})")
    return f"{service.namespace}/{service.hostname}"


def declare_route(
    topology: Topology,
    name: str,
    namespace: str,
    services: Sequence[str],
    rules: Sequence[Mapping[str, Any]],
) -> str:
    """An HTTPRoute on `services` (names); backends name services too."""
    what = f"route {name!r}"
    parents = [_service_key(topology, s, what) for s in services]
    keyed = []
    for rule in rules:
        backends = [
            {**b, "service": _service_key(topology, str(b.get("service")), what)}
            for b in rule.get("backends", [])
        ]
        keyed.append({**rule, "backends": backends} if backends else dict(rule))
        if rule.get("filters"):  # a mirror names a service as backends do
            keyed[-1]["filters"] = [_mirror_keyed(topology, f, what) for f in rule["filters"]]
    try:
        topology.l7.add_route(name, namespace, parents, keyed)
    except WaypointError as exc:
        raise topology.error(str(exc)) from None
    return name


def _mirror_keyed(topology: Topology, rule_filter: Any, what: str) -> Any:
    mirror = rule_filter.get("requestMirror") if isinstance(rule_filter, dict) else None
    if not isinstance(mirror, dict):
        return rule_filter
    ref = mirror.get("backendRef")
    if not isinstance(ref, dict) or "service" not in ref:
        return rule_filter
    keyed_ref = {**ref, "service": _service_key(topology, str(ref["service"]), what)}
    return {**rule_filter, "requestMirror": {**mirror, "backendRef": keyed_ref}}


def declare_l7_policy(
    topology: Topology,
    name: str,
    namespace: str,
    action: str,
    services: Sequence[str],
    rules: Sequence[Mapping[str, Any]],
) -> str:
    what = f"L7 policy {name!r}"
    targets = [_service_key(topology, s, what) for s in services]
    data = {"name": name, "namespace": namespace, "action": action.upper(),
            "targets": targets, "rules": list(rules)}  # fmt: skip
    try:
        topology.l7.add_policy(data)
    except WaypointError as exc:
        raise topology.error(str(exc)) from None
    return name


def topology_labels(
    topology: Topology,
) -> tuple[dict[str, ObjectLabels], dict[str, ObjectLabels], dict[str, str]]:
    """(workloads by uid, services by key, waypoint pod IPs by key) of a planned topology."""
    decls = topology.l7
    waypoint_pods = {f"{s.namespace}/{s.name}" for s in decls.waypoints.values()}
    workloads = {
        pod.uid: ObjectLabels(
            pod.labels, pod.namespace, f"{pod.namespace}/{pod.name}" in waypoint_pods
        )
        for pod in topology.pods.values()
    }
    services = {
        f"{svc.namespace}/{svc.hostname}": ObjectLabels(svc.labels, svc.namespace)
        for svc in topology.services.values()
    }
    ips = {
        f"{pod.namespace}/{pod.name}": pod.ip
        for pod in topology.pods.values()
        if f"{pod.namespace}/{pod.name}" in waypoint_pods
    }
    return workloads, services, ips


def attach_topology(config: LocalConfig, topology: Topology) -> LocalConfig:
    """The mesh config with the waypoints the topology's labels ask for."""
    if not topology.l7.waypoints:
        return config
    workloads, services, ips = topology_labels(topology)
    try:
        return attach(config, topology.l7, workloads, services, ips)
    except WaypointError as exc:
        raise topology.error(str(exc)) from None


ReadyProbe = Callable[["Pod"], bool]


class WaypointProcesses:
    """The topology's waypoints as processes in their pods, each with its own certificate
    and L7 file under `folder`, all reading the shared mesh config (and its reloads)."""

    def __init__(
        self, cluster: Cluster, mesh_config: Path, ca: CertificateAuthority, folder: Path
    ) -> None:
        self.cluster = cluster
        self.mesh_config = mesh_config
        self.ca = ca
        self.folder = folder
        self.processes: dict[str, ManagedProcess] = {}

    @property
    def specs(self) -> dict[str, WaypointSpec]:
        return {spec.name: spec for spec in self.cluster.topology.l7.waypoints.values()}

    def start_all(self, config: LocalConfig, ready: ReadyProbe, timeout: float = 15.0) -> None:
        self.write_l7(config)
        for name in self.specs:
            self.start(name)
        for name in self.specs:
            self.await_ready(name, ready, timeout)

    def write_l7(self, config: LocalConfig) -> None:
        """(Re)write every waypoint's L7 file; running waypoints reload it."""
        for spec in self.specs.values():
            path = self.folder / f"waypoint-{spec.name}.yaml"
            if not path.exists():
                self.cluster._lab.add_file(path)
            write_l7_config(path, l7_config_for(spec, config, self.cluster.topology.l7))

    def start(self, name: str) -> ManagedProcess:
        spec = self.specs[name]
        certs = self.folder / f"waypoint-{name}-certs"
        if not certs.exists():
            self.cluster._lab.add_dir(certs)
            identity = Identity(self.ca.trust_domain, spec.namespace, spec.name)
            self.ca.issue(identity).write(certs)
        argv = [
            sys.executable, "-m", "testbed.mesh.waypoint",
            "--mesh-config", str(self.mesh_config),
            "--l7-config", str(self.folder / f"waypoint-{name}.yaml"),
            "--certs", str(certs),
            "--name", f"waypoint-{name}",
        ]  # fmt: skip
        process = self.cluster.pod(name).spawn(argv, label="waypoint")
        self.processes[name] = process
        return process

    def await_ready(self, name: str, ready: ReadyProbe, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        process = self.processes[name]
        while not ready(self.cluster.pod(name)):
            if process.poll() is not None:
                raise WaypointError(f"waypoint {name} exited: {process.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise WaypointError(f"waypoint {name} not ready after {timeout} s")
            time.sleep(0.05)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.terminate()

    def proxy_pids(self) -> dict[str, int]:
        return {
            f"waypoint-{name}": process.pid
            for name, process in self.processes.items()
            if process.poll() is None
        }
