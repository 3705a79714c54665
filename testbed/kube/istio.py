"""The one translation between the topology model's declarations and Istio's resources.

Both directions live here, so that they stay each other's inverse: `export_*` turns a
planned topology's policies, waypoints and routes into AuthorizationPolicies, Gateways and
HTTPRoutes (testbed.kube.resources); `declare` and `withdraw` turn those resources back into
(or out of) a topology's declarations. Everything this module reads of a topology goes
through its public attributes: `policies`, `services`, `pods`, and `l7` (waypoints,
namespace_labels, routes, policies), and the rest of testbed.kube reads those L7
declarations only through the functions here, so a change of their home touches one module.

What the resources cannot say is returned as notes by the exporter, and what the testbed
cannot honour is refused by the parser (testbed.kube.documents) with its field path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from testbed.cluster.model import PolicyRule, PolicySpec, ServiceSpec, Topology, TopologyError
from testbed.kube import resources as r
from testbed.mesh.config import StringMatch
from testbed.mesh.waypoint.l7authz import L7Policy
from testbed.mesh.waypoint.routing import DEFAULT_RULE, HttpRoute, RouteRule
from testbed.netlab.errors import TestbedError

DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"
WAYPOINT_FOR = "istio.io/waypoint-for"
LABEL_KEYS = (DATAPLANE_MODE, USE_WAYPOINT)
L4_SOURCE_FIELDS = ("principals", "not_principals", "namespaces", "not_namespaces",
                    "ip_blocks", "not_ip_blocks")  # fmt: skip
L7_SOURCE_FIELDS = ("principals", "not_principals", "namespaces", "not_namespaces")
L7_OPERATION_FIELDS = ("methods", "not_methods", "paths", "not_paths")


@dataclass
class Exported:
    """Istio resources of a topology, and what they could not carry."""

    policies: list[r.AuthorizationPolicy] = field(default_factory=list)
    gateways: list[r.Gateway] = field(default_factory=list)
    routes: list[r.HTTPRoute] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def all(self) -> list[r.IstioResource]:
        return [*self.gateways, *self.policies, *self.routes]


# ================================================================ what the model declares


def waypoint_keys(topology: Topology) -> set[str]:
    """ "<namespace>/<name>" of every waypoint (each is also a pod of that name)."""
    return set(topology.l7.waypoints)


def namespace_labels(topology: Topology) -> dict[str, dict[str, str]]:
    """The labels the topology puts on namespaces (e.g. istio.io/use-waypoint)."""
    return topology.l7.namespace_labels


# ================================================================ model -> resources


def export_topology(topology: Topology) -> Exported:
    out = Exported()
    out.gateways = [
        r.Gateway(
            metadata=r.ObjectMeta(
                name=spec.name,
                namespace=spec.namespace,
                labels=None
                if spec.waypoint_for == "service"
                else {WAYPOINT_FOR: spec.waypoint_for},
            )
        )
        for spec in topology.l7.waypoints.values()
    ]
    if topology.l7.waypoints:
        out.notes.append(
            "waypoints: Istio schedules each waypoint's Deployment itself; the node the "
            "topology put it on is not pinned"
        )
    out.policies = [export_l4_policy(p) for p in topology.policies.values()]
    for l7 in topology.l7.policies:
        exported = export_l7_policy(topology, l7)
        if exported.spec.target_refs:
            out.policies.append(exported)
        else:  # an empty targetRefs would make it an L4 policy on the whole namespace
            out.notes.append(
                f"L7 policy {l7.namespace}/{l7.name}: its namespace has no waypoint, so it "
                "applies to nothing; not exported"
            )
    for route in topology.l7.routes:
        resource, notes = export_route(topology, route)
        out.routes.append(resource)
        out.notes += notes
    return out


def export_l4_policy(policy: PolicySpec) -> r.AuthorizationPolicy:
    selector = r.WorkloadSelector(match_labels=dict(policy.selector)) if policy.selector else None
    spec = r.AuthorizationPolicySpec(
        selector=selector, action=policy.action, rules=[_l4_rule(rule) for rule in policy.rules]
    )
    return r.AuthorizationPolicy(metadata=_meta(policy.name, policy.namespace), spec=spec)


def _l4_rule(rule: PolicyRule) -> r.Rule:
    source = {name: list(getattr(rule, name)) for name in L4_SOURCE_FIELDS if getattr(rule, name)}
    operation = _port_fields(rule)
    return _rule(
        [r.From(source=r.Source(**source))] if source else None,
        [r.To(operation=r.Operation(**operation))] if operation else None,
        None,
    )


def _port_fields(match: Any) -> dict[str, list[str]]:
    """The ports and not_ports an L4 rule or an L7 operation sets, as Istio writes them."""
    return {
        name: [str(p) for p in getattr(match, name)]
        for name in ("ports", "not_ports")
        if getattr(match, name)
    }


def _rule(
    sources: list[r.From] | None, operations: list[r.To] | None, when: list[r.Condition] | None
) -> r.Rule:
    return r.Rule.model_validate({"from": sources, "to": operations, "when": when})


def _wildcard(match: StringMatch) -> str:
    """Istio's string form of a match: exact, "prefix*", "*suffix", "*"."""
    forms = {"Exact": "{}", "Prefix": "{}*", "Suffix": "*{}", "Presence": "*"}
    return forms[match.kind].format(match.value)


def _strings(matches: Iterable[StringMatch]) -> list[str] | None:
    items = [_wildcard(m) for m in matches]
    return items or None


def _string_fields(model: Any, names: Iterable[str]) -> dict[str, list[str] | None]:
    """The named string-match fields of an L7 source or operation, in Istio's forms."""
    return {name: _strings(getattr(model, name)) for name in names}


def export_l7_policy(topology: Topology, policy: L7Policy) -> r.AuthorizationPolicy:
    if policy.targets:
        refs = [
            r.PolicyTargetReference(kind="Service", name=_service_by_key(topology, key).name)
            for key in policy.targets
        ]
    else:  # everything the namespace's waypoints serve
        refs = [
            r.PolicyTargetReference(group=r.GATEWAY_GROUP, kind="Gateway", name=w.name)
            for w in topology.l7.waypoints.values()
            if w.namespace == policy.namespace
        ]
    rules = []
    for rule in policy.rules:
        sources = [
            r.From(source=r.Source(**_string_fields(s, L7_SOURCE_FIELDS))) for s in rule.sources
        ]
        operations = [
            r.To(operation=r.Operation(**_port_fields(o), **_string_fields(o, L7_OPERATION_FIELDS)))
            for o in rule.to
        ]
        conditions = [
            r.Condition(key=c.key, values=_strings(c.values), not_values=_strings(c.not_values))
            for c in rule.when
        ]
        rules.append(_rule(sources or None, operations or None, conditions or None))
    spec = r.AuthorizationPolicySpec(target_refs=refs, action=policy.action, rules=rules)
    return r.AuthorizationPolicy(metadata=_meta(policy.name, policy.namespace), spec=spec)


def export_route(topology: Topology, route: HttpRoute) -> tuple[r.HTTPRoute, list[str]]:
    notes = []
    parents = [
        r.ParentReference(name=svc.name, namespace=_other_ns(svc, route.namespace))
        for svc in (_service_by_key(topology, key) for key in route.parents)
    ]
    rules = []
    for index, rule in enumerate(route.rules):
        for name, value in (("retry", rule.retry), ("fault", rule.fault)):
            if value != getattr(DEFAULT_RULE, name):
                notes.append(
                    f"route {route.namespace}/{route.name} rule {index}: {name} has no "
                    "HTTPRoute field Istio's waypoint honours; not exported"
                )
        rules.append(_route_rule(topology, route.namespace, rule))
        notes += [
            f"route {route.namespace}/{route.name} rule {index}: backend {b.service} keeps the "
            "request's port in the testbed; Gateway API needs one, its first port was written"
            for b in rule.backends
            if b.port is None and len(_service_by_key(topology, b.service).ports) > 1
        ]
    spec = r.HTTPRouteSpec(parent_refs=parents, rules=rules or None)
    return r.HTTPRoute(metadata=_meta(route.name, route.namespace), spec=spec), notes


def _route_rule(topology: Topology, namespace: str, rule: RouteRule) -> r.HTTPRouteRule:
    matches = [
        r.HTTPRouteMatch(
            path=r.HTTPPathMatch(type=m.path.type, value=m.path.value),
            headers=[r.HTTPHeaderMatch(name=h.name, value=h.value) for h in m.headers] or None,
            method=m.method,
        )
        for m in rule.matches
    ]
    backends = []
    for backend in rule.backends:
        svc = _service_by_key(topology, backend.service)
        backends.append(
            r.HTTPBackendRef(
                name=svc.name,
                namespace=_other_ns(svc, namespace),
                port=backend.port or min(svc.ports),
                weight=backend.weight if backend.weight != 1 else None,
            )
        )
    timeouts = r.HTTPRouteTimeouts(request=_duration(rule.timeout)) if rule.timeout else None
    return r.HTTPRouteRule(
        matches=matches or None, backend_refs=backends or None, timeouts=timeouts
    )


def _duration(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _other_ns(svc: ServiceSpec, namespace: str) -> str | None:
    return None if svc.namespace == namespace else svc.namespace


def _meta(name: str, namespace: str) -> r.ObjectMeta:
    return r.ObjectMeta(name=name, namespace=namespace)


def _service_by_key(topology: Topology, key: str) -> ServiceSpec:
    for svc in topology.services.values():
        if f"{svc.namespace}/{svc.hostname}" == key:
            return svc
    raise topology.error(f"no service with key {key!r}")


# ================================================================ resources -> model


class ApplyError(TestbedError, ValueError):
    """A resource that names something the topology does not have."""


def declare_file(topology: Topology, path: str) -> None:
    """Every resource of an Istio YAML file, declared in `topology` (Topology.apply_yaml)."""
    from pathlib import Path

    from testbed.kube.documents import DocumentError, load_documents

    try:
        for resource in load_documents(Path(path)):
            declare(topology, resource)
    except (DocumentError, ApplyError) as exc:
        raise topology.error(f"apply_yaml: {exc}") from None


def declare(topology: Topology, resource: r.IstioResource, *, waypoint_node: str = "") -> None:
    """Add `resource` to the topology's declarations (replacing one of the same name); a
    Gateway that is already declared stays as it is."""
    if isinstance(resource, r.Gateway):
        existing = topology.l7.waypoints.get(
            f"{resource.metadata.namespace}/{resource.metadata.name}"
        )
        wanted = (resource.metadata.labels or {}).get(WAYPOINT_FOR, "service")
        if existing is not None and existing.waypoint_for == wanted:
            return
    withdraw(topology, resource, missing_ok=True)
    try:
        if isinstance(resource, r.AuthorizationPolicy):
            _declare_policy(topology, resource)
        elif isinstance(resource, r.Gateway):
            node = waypoint_node or next(iter(topology.nodes), "")
            topology.add_waypoint(
                resource.metadata.name,
                node,
                namespace=resource.metadata.namespace,
                waypoint_for=(resource.metadata.labels or {}).get(WAYPOINT_FOR, "service"),
            )
        elif isinstance(resource, r.HTTPRoute):
            _declare_route(topology, resource)
        else:
            set_labels(topology, resource)
    except TopologyError as exc:
        raise ApplyError(str(exc)) from None


def withdraw(topology: Topology, resource: r.IstioResource, *, missing_ok: bool = False) -> None:
    """Remove what `resource` declared; label patches remove the labels they name."""
    name, namespace = resource.metadata.name, resource.metadata.namespace or "default"
    found = False
    if isinstance(resource, r.AuthorizationPolicy):
        policy = topology.policies.get(name)
        if policy is not None and policy.namespace == namespace:
            del topology.policies[name]
            found = True
        kept = [p for p in topology.l7.policies if (p.name, p.namespace) != (name, namespace)]
        found |= len(kept) != len(topology.l7.policies)
        topology.l7.policies[:] = kept
    elif isinstance(resource, r.HTTPRoute):
        kept_routes = [x for x in topology.l7.routes if (x.name, x.namespace) != (name, namespace)]
        found = len(kept_routes) != len(topology.l7.routes)
        topology.l7.routes[:] = kept_routes
    elif isinstance(resource, r.Gateway):
        found = f"{namespace}/{name}" in topology.l7.waypoints
        if found and not missing_ok:
            raise ApplyError(f"Gateway {namespace}/{name}: removing a waypoint is not supported")
    else:
        found = True
        labels = _labels_of(topology, resource)
        for key in resource.metadata.labels or {}:
            labels.pop(key, None)
    if not found and not missing_ok:
        raise ApplyError(f"{resource.kind} {namespace}/{name}: not applied to this testbed")


def _declare_policy(topology: Topology, ap: r.AuthorizationPolicy) -> None:
    spec, meta = ap.spec, ap.metadata
    if spec.target_refs:
        services = []
        for ref in spec.target_refs:
            if ref.kind == "Service":
                services.append(_service_named(topology, ref.name, meta.namespace).name)
            elif f"{meta.namespace}/{ref.name}" not in topology.l7.waypoints:
                raise ApplyError(f"AuthorizationPolicy {meta.name}: no waypoint {ref.name!r}")
        topology.add_l7_policy(
            meta.name,
            action=spec.action,
            namespace=meta.namespace,
            services=services,
            rules=[_l7_rule(rule) for rule in spec.rules or []],
        )
        return
    rules = [clause for rule in spec.rules or [] for clause in _l4_clauses(rule)]
    selector = dict(spec.selector.match_labels) if spec.selector else None
    topology.add_policy(
        meta.name, action=spec.action, namespace=meta.namespace, selector=selector, rules=rules
    )


def _l4_clauses(rule: r.Rule) -> list[dict[str, Any]]:
    """An Istio rule (any source AND any operation) as model rules (all fields must hold):
    one model rule per source/operation pair, so their union is the Istio rule."""
    sources = [s.source.model_dump(exclude_none=True) for s in rule.from_ or []] or [{}]
    operations = [
        {k: [int(p) for p in v] for k, v in o.operation.model_dump(exclude_none=True).items()}
        for o in rule.to or []
    ] or [{}]
    return [{**s, **o} for s in sources for o in operations]


def _l7_rule(rule: r.Rule) -> dict[str, Any]:
    def ports(op: dict[str, Any]) -> dict[str, Any]:
        for key in ("ports", "not_ports"):
            if key in op:
                op[key] = [int(p) for p in op[key]]
        return op

    data: dict[str, Any] = {}
    if rule.from_:
        data["from"] = [f.source.model_dump(exclude_none=True) for f in rule.from_]
    if rule.to:
        data["to"] = [ports(t.operation.model_dump(exclude_none=True)) for t in rule.to]
    if rule.when:
        data["when"] = [c.model_dump(exclude_none=True) for c in rule.when]
    return data


def _declare_route(topology: Topology, route: r.HTTPRoute) -> None:
    ns = route.metadata.namespace
    parents = [
        _service_named(topology, p.name, p.namespace or ns).name for p in route.spec.parent_refs
    ]
    rules = []
    for rule in route.spec.rules or []:
        data: dict[str, Any] = {}
        if rule.matches:
            data["matches"] = [m.model_dump(exclude_none=True) for m in rule.matches]
            for match in data["matches"]:
                for header in match.get("headers", []):
                    header.pop("type", None)
        if rule.backend_refs:
            data["backends"] = [_backend(topology, b, ns) for b in rule.backend_refs]
        if rule.timeouts:
            data["timeout"] = parse_duration(rule.timeouts.request)
        rules.append(data)
    topology.add_http_route(route.metadata.name, services=parents, rules=rules, namespace=ns)


def _backend(topology: Topology, ref: r.HTTPBackendRef, namespace: str) -> dict[str, Any]:
    """A backend of the model; the port of a single-port service is left to the request's
    port, which is the same (the inverse of export_route's choice)."""
    svc = _service_named(topology, ref.name, ref.namespace or namespace)
    backend: dict[str, Any] = {"service": svc.name}
    if list(svc.ports) != [ref.port]:
        backend["port"] = ref.port
    if ref.weight is not None:
        backend["weight"] = ref.weight
    return backend


def parse_duration(text: str) -> float:
    """A Gateway API duration ("1h", "2s", "500ms", "1m30s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total, number = 0.0, ""
    index = 0
    while index < len(text):
        char = text[index]
        if char.isdigit():
            number += char
            index += 1
            continue
        unit = "ms" if text.startswith("ms", index) else char
        if not number or unit not in units:
            raise ValueError(f"duration {text!r}: expected digits and units h, m, s, ms")
        total += int(number) * units[unit]
        number = ""
        index += len(unit)
    if number or not text:
        raise ValueError(f"duration {text!r}: expected digits and units h, m, s, ms")
    return total


def set_labels(topology: Topology, patch: r.LabelPatch) -> None:
    _labels_of(topology, patch).update(patch.metadata.labels)


def _labels_of(topology: Topology, patch: r.IstioResource) -> dict[str, str]:
    meta = patch.metadata
    if patch.kind == "Namespace":
        return topology.l7.namespace_labels.setdefault(meta.name, {})
    namespace = meta.namespace or "default"
    if patch.kind == "Service":
        return _service_named(topology, meta.name, namespace).labels
    pod = topology.pods.get(meta.name)
    if pod is None or pod.namespace != namespace:
        raise ApplyError(f"Pod {namespace}/{meta.name}: no such pod in the topology")
    return pod.labels


def _service_named(topology: Topology, name: str, namespace: str) -> ServiceSpec:
    svc = topology.services.get(name)
    if svc is None or svc.namespace != namespace:
        known = ", ".join(f"{s.namespace}/{s.name}" for s in topology.services.values())
        raise ApplyError(f"no service {namespace}/{name} in the topology (services: {known})")
    return svc
