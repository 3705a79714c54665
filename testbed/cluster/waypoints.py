"""Waypoints in topology scripts: the declarations and Istio's attachment labels.

A waypoint is a pod of its own (service account = its name, never captured) running
`python -m testbed.mesh.waypoint`. Istio's labels decide who uses it:

- `istio.io/use-waypoint: <name>` on a namespace, a service or a pod; the object's own
  label wins over its namespace's, and `none` opts it out. The waypoint is looked up in the
  object's namespace, or in `istio.io/use-waypoint-namespace` when that is set.
- `istio.io/waypoint-for` on the waypoint: `service` (the default: traffic to service VIPs),
  `workload` (traffic to pod IPs), `all`, or `none`.

Routes (HTTPRoute-like) attach to services by name; L7 policies target services by name,
or, with none named, everything the waypoints of their namespace serve. What follows from
the labels (waypoint fields in the mesh config, each waypoint's L7 file) is the control
plane's (testbed.redirect.waypoint_config); the processes are the mode's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import ValidationError

from testbed.mesh.waypoint.l7authz import L7Policy
from testbed.mesh.waypoint.routing import HttpRoute
from testbed.netlab.errors import TestbedError

if TYPE_CHECKING:
    from testbed.cluster.model import Topology

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
DATAPLANE_MODE = "istio.io/dataplane-mode"
OPT_OUT = "none"
WaypointFor = Literal["service", "workload", "all", "none"]
Kind = Literal["service", "workload"]


class WaypointError(TestbedError, ValueError):
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


def _validated(model: Any, data: dict[str, Any], what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise WaypointError(f"{what}: {problems}") from None


# ---------------------------------------------------------------- a topology's waypoints


@contextmanager
def _as_topology_error(topology: Topology) -> Iterator[None]:
    """A WaypointError raised inside becomes the topology's error (it names the file)."""
    try:
        yield
    except WaypointError as exc:
        raise topology.error(str(exc)) from None


def declare_waypoint(
    topology: Topology, name: str, node: str, namespace: str, waypoint_for: str
) -> str:
    """A waypoint pod (service account = its name) and its declaration."""
    spec = WaypointSpec(name, namespace, node, waypoint_for)  # type: ignore[arg-type]
    with _as_topology_error(topology):
        topology.l7.add_waypoint(spec)
    labels = topology.l7.waypoint_labels(spec)
    return topology.add_pod(name, node, namespace=namespace, service_account=name, labels=labels)


@dataclass(frozen=True)
class _ServiceKeys:
    """The service names of one declaration (`what`) as "<namespace>/<hostname>" keys; an
    unknown name is the topology's error, naming the declaration."""

    topology: Topology
    what: str

    def __call__(self, name: str) -> str:
        service = self.topology.services.get(name)
        if service is None:
            known = ", ".join(self.topology.services) or "none declared yet"
            raise self.topology.error(f"{self.what}: unknown service {name!r} (services: {known})")
        return f"{service.namespace}/{service.hostname}"

    def of(self, names: Iterable[str]) -> list[str]:
        return [self(name) for name in names]


def declare_route(
    topology: Topology,
    name: str,
    namespace: str,
    services: Sequence[str],
    rules: Sequence[Mapping[str, Any]],
) -> str:
    """An HTTPRoute on `services` (names); backends name services too."""
    key = _ServiceKeys(topology, f"route {name!r}")
    parents = key.of(services)
    keyed = [_rule_keyed(rule, key) for rule in rules]
    with _as_topology_error(topology):
        topology.l7.add_route(name, namespace, parents, keyed)
    return name


def _rule_keyed(rule: Mapping[str, Any], key: _ServiceKeys) -> dict[str, Any]:
    """A route rule whose backends and mirrors name their services by key."""
    keyed = dict(rule)
    backends = [{**b, "service": key(str(b.get("service")))} for b in rule.get("backends", [])]
    if backends:
        keyed["backends"] = backends
    if rule.get("filters"):  # a mirror names a service as backends do
        keyed["filters"] = [_mirror_keyed(f, key) for f in rule["filters"]]
    return keyed


def _mirror_keyed(rule_filter: Any, key: _ServiceKeys) -> Any:
    mirror = rule_filter.get("requestMirror") if isinstance(rule_filter, dict) else None
    if not isinstance(mirror, dict):
        return rule_filter
    ref = mirror.get("backendRef")
    if not isinstance(ref, dict) or "service" not in ref:
        return rule_filter
    keyed_ref = {**ref, "service": key(str(ref["service"]))}
    return {**rule_filter, "requestMirror": {**mirror, "backendRef": keyed_ref}}


def declare_l7_policy(
    topology: Topology,
    name: str,
    namespace: str,
    action: str,
    services: Sequence[str],
    rules: Sequence[Mapping[str, Any]],
) -> str:
    targets = _ServiceKeys(topology, f"L7 policy {name!r}").of(services)
    data = {"name": name, "namespace": namespace, "action": action.upper(),
            "targets": targets, "rules": list(rules)}  # fmt: skip
    with _as_topology_error(topology):
        topology.l7.add_policy(data)
    return name
