"""The Mininet-style cluster model: what a topology script declares.

A topology is a class whose `build()` adds nodes, pods, services, policies and underlay
link parameters. Nothing here touches the system; `plan()` validates the whole model and
assigns addresses before anything is created, so bad input leaves nothing half-built.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from testbed.cluster import waypoints
from testbed.mesh.appprotocol import APP_PROTOCOLS, AppProtocol, normalize
from testbed.netlab.errors import TestbedError

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
UNDERLAY = ipaddress.IPv4Network("172.18.0.0/16")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_NET = ipaddress.IPv4Network("10.96.0.0/16")
MAX_NODES = 200
MAX_PODS_PER_NODE = 250
ROOT_NAMESPACE = "istio-system"  # policies here apply mesh-wide, as in Istio


class TopologyError(TestbedError):
    """A mistake in a topology: the message names the topology, the item and the problem."""


@dataclass(frozen=True)
class LinkParams:
    """Shaping of a node's underlay link: rate like '1gbit', delay like '1ms', loss in %."""

    rate: str | None = None
    delay: str | None = None
    loss: float | None = None

    @property
    def shaped(self) -> bool:
        return any(v is not None for v in (self.rate, self.delay, self.loss))


@dataclass
class NodeSpec:
    name: str
    link: LinkParams = field(default_factory=LinkParams)
    bridge: str = "br0"
    index: int = 0
    underlay_ip: str = ""
    pod_cidr: str = ""
    gateway_ip: str = ""


APP_PORTS = {"http-echo": 8080, "iperf3": 5201, "sockperf": 11111}  # the tools' defaults
"""The servers a pod can declare by name, with the port each listens on unless told."""


@dataclass(frozen=True)
class AppSpec:
    """The server a pod runs from the moment the testbed is up: a named app (APP_PORTS, with
    `argv` its extra arguments, e.g. `http-echo --fail-every 3`) or a command (`argv`).
    `port` is where it listens (None: a command that listens nowhere)."""

    kind: str  # a key of APP_PORTS, or "command"
    port: int | None = None
    argv: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.kind if self.kind != "command" else "cmd"

    def describe(self) -> str:
        what = shlex.join(self.argv if self.kind == "command" else (self.kind, *self.argv))
        return what if self.port is None else f"{what} :{self.port}"


@dataclass
class PodSpec:
    name: str
    node: str
    namespace: str = "default"
    service_account: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = ""
    host_ifname: str = ""
    uid: str = ""
    app: AppSpec | None = None


@dataclass
class ServiceSpec:
    name: str
    namespace: str
    selector: dict[str, str]
    ports: dict[int, int]  # service port -> target port
    vip: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # service port -> its Kubernetes appProtocol (testbed.mesh.appprotocol); absent: sniffed
    app_protocols: dict[int, AppProtocol] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class PolicyRule:
    """One rule of an AuthorizationPolicy: all listed conditions must hold."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


@dataclass
class PolicySpec:
    """An L4 AuthorizationPolicy. Namespace istio-system means mesh-wide."""

    name: str
    namespace: str
    action: Literal["ALLOW", "DENY"]
    selector: dict[str, str] | None
    rules: list[PolicyRule]


RULE_FIELDS = {f for f in PolicyRule.__dataclass_fields__}


class Topology:
    """Base class of topology scripts. Override `build()`; parameters arrive as kwargs."""

    name = "custom"

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.nodes: dict[str, NodeSpec] = {}
        self.pods: dict[str, PodSpec] = {}
        self.services: dict[str, ServiceSpec] = {}
        self.policies: dict[str, PolicySpec] = {}
        self.bridges: list[str] = ["br0"]
        self.bridge_links: list[tuple[str, str]] = []
        self.l7 = waypoints.L7Declarations()  # waypoints, namespace labels, routes, L7 policies

    def build(self) -> None:
        """Add nodes, pods, services and policies here."""

    # -- declarations --------------------------------------------------------------
    def add_node(
        self,
        name: str,
        *,
        rate: str | None = None,
        delay: str | None = None,
        loss: float | None = None,
        bridge: str = "br0",
    ) -> str:
        self._check_name("node", name)
        if name in self.nodes:
            raise self.error(f"duplicate node name {name!r}")
        if len(self.nodes) >= MAX_NODES:  # at once: nodes=209209 took minutes (fuzzing)
            raise self.error(f"more than {MAX_NODES} nodes; at most {MAX_NODES} are supported")
        if bridge not in self.bridges:
            raise self.error(f"node {name!r} is attached to unknown bridge {bridge!r}")
        self.nodes[name] = NodeSpec(name, LinkParams(rate, delay, loss), bridge)
        return name

    def add_mininet_underlay(self, topo: Any) -> list[str]:
        """Take the underlay from a Mininet `Topo`: its switches become bridges in the
        fabric namespace, its hosts become nodes (with `bw`/`delay`/`loss` of their link).
        Only Mininet's description is used, not its runtime (no Open vSwitch, no mnexec).
        Returns the node names."""
        from testbed.cluster.mininet import underlay_from_topo

        return underlay_from_topo(self, topo)

    def add_pod(
        self,
        name: str,
        node: str,
        *,
        namespace: str = "default",
        service_account: str | None = None,
        labels: dict[str, str] | None = None,
        app: str | Sequence[str] | None = None,
        port: int | None = None,
    ) -> str:
        """A pod on `node`. `app` is a server started in it once the mode is installed:
        "http-echo", "iperf3", "sockperf" (each on its usual port unless `port` says; words
        after the name are its own arguments: "http-echo --fail-every 3"), or a command (a
        list of words or a command line) listening on `port` if one is given."""
        self._check_name("pod", name)
        self._check_name("namespace", namespace)
        if name in self.pods:
            raise self.error(f"duplicate pod name {name!r}")
        if len(self.pods) >= MAX_NODES * MAX_PODS_PER_NODE:  # at once, as for nodes
            raise self.error(f"more than {MAX_NODES * MAX_PODS_PER_NODE} pods in all")
        if node not in self.nodes:
            known = ", ".join(self.nodes) or "none declared yet"
            raise self.error(f"pod {name!r} is placed on unknown node {node!r} (nodes: {known})")
        sa = service_account or name
        self._check_name("service account", sa)
        spec = PodSpec(name, node, namespace, sa, dict(labels or {}))
        spec.app = self._app(name, app, port)
        self.pods[name] = spec
        return name

    def add_service(
        self,
        name: str,
        *,
        selector: dict[str, str],
        ports: dict[int, int] | list[int],
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        app_protocols: dict[int, str] | None = None,
    ) -> str:
        """A ClusterIP service. `app_protocols` declares a port's protocol as Kubernetes'
        `appProtocol` does ({9080: "http"}: HTTP without sniffing; "tcp": L4 even if the
        bytes look like HTTP); an undeclared port is sniffed."""
        self._check_name("service", name)
        if name in self.services:
            raise self.error(f"duplicate service name {name!r}")
        if not selector:
            raise self.error(f"service {name!r} needs a non-empty selector")
        port_map = {p: p for p in ports} if isinstance(ports, list) else dict(ports)
        for port in (*port_map, *port_map.values()):
            if not isinstance(port, int) or not 0 < port < 65536:
                raise self.error(f"service {name!r}: port {port!r} is not in 1-65535")
        declared = self._app_protocols(name, port_map, app_protocols or {})
        self.services[name] = ServiceSpec(
            name, namespace, dict(selector), port_map, labels=dict(labels or {}),
            app_protocols=declared,
        )  # fmt: skip
        return name

    def add_policy(
        self,
        name: str,
        *,
        action: str = "ALLOW",
        namespace: str = "default",
        selector: dict[str, str] | None = None,
        rules: list[dict[str, Any]] | None = None,
    ) -> str:
        self._check_name("policy", name)
        if name in self.policies:
            raise self.error(f"duplicate policy name {name!r}")
        act = action.upper()
        if act not in ("ALLOW", "DENY"):
            raise self.error(f"policy {name!r}: action {action!r} is not ALLOW or DENY")
        parsed = [self._policy_rule(name, i, r) for i, r in enumerate(rules or [])]
        self.policies[name] = PolicySpec(name, namespace, act, selector, parsed)  # type: ignore[arg-type]
        return name

    def label_namespace(self, namespace: str, labels: dict[str, str]) -> None:
        """Namespace labels, e.g. istio.io/use-waypoint (the model has no namespace objects)."""
        self._check_name("namespace", namespace)
        self.l7.namespace_labels.setdefault(namespace, {}).update(labels)

    def add_waypoint(
        self, name: str, node: str, *, namespace: str = "default", waypoint_for: str = "service"
    ) -> str:
        """A waypoint pod (L7 proxy) with its own identity; see testbed.cluster.waypoints."""
        return waypoints.declare_waypoint(self, name, node, namespace, waypoint_for)

    def add_http_route(
        self,
        name: str,
        *,
        services: list[str],
        rules: list[dict[str, Any]],
        namespace: str = "default",
    ) -> str:
        """An HTTPRoute-like route for `services` (names) in their waypoint."""
        return waypoints.declare_route(self, name, namespace, services, rules)

    def add_l7_policy(
        self,
        name: str,
        *,
        action: str = "ALLOW",
        namespace: str = "default",
        services: list[str] | None = None,
        rules: list[dict[str, Any]] | None = None,
    ) -> str:
        """An L7 AuthorizationPolicy enforced by the waypoint of `services` (none: all the
        traffic of the namespace's waypoints)."""
        return waypoints.declare_l7_policy(
            self, name, namespace, action, services or [], rules or []
        )

    def apply_yaml(self, path: str) -> None:
        """Declare the Istio resources of a YAML file (AuthorizationPolicies, waypoint
        Gateways, HTTPRoutes, istio.io label patches), as `testbed apply` reads them; call it
        in build() after the services it names. Implemented in testbed.kube.istio."""
        from testbed.kube.istio import declare_file  # the translation lives with the exporter

        declare_file(self, path)

    def remove_policy(self, name: str) -> None:
        if self.policies.pop(name, None) is None:
            raise self.error(f"no policy named {name!r}")

    # -- helpers -------------------------------------------------------------------
    def error(self, message: str) -> TopologyError:
        return TopologyError(f"topology {self.name}: {message}")

    def _check_name(self, what: str, name: str) -> None:
        if not isinstance(name, str) or not DNS_LABEL.match(name):
            raise self.error(
                f"{what} name {name!r} is not a DNS label "
                "(lowercase letters, digits and '-', at most 63 characters)"
            )

    def _app(self, pod: str, app: str | Sequence[str] | None, port: int | None) -> AppSpec | None:
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
            raise self.error(f"pod {pod!r}: port {port!r} is not an integer in 1-65535")
        if port is not None and not 0 < port < 65536:
            raise self.error(f"pod {pod!r}: port {port} is not in 1-65535")
        if app is None:
            if port is not None:
                raise self.error(f"pod {pod!r}: port={port} without an app (set app= too)")
            return None
        if isinstance(app, str) and " " not in app.strip() and app not in APP_PORTS:
            raise self.error(
                f"pod {pod!r}: app {app!r} is not one of {sorted(APP_PORTS)} nor a command line "
                "(give a command as a list of words, or a line with its arguments)"
            )
        try:
            argv = shlex.split(app) if isinstance(app, str) else list(app)
        except ValueError as exc:
            raise self.error(f"pod {pod!r}: app {app!r} is not a command line: {exc}") from None
        if not argv or not all(isinstance(word, str) and word for word in argv):
            raise self.error(f"pod {pod!r}: app {app!r}: a command needs non-empty string words")
        if argv[0] in APP_PORTS:  # a named app with arguments of its own
            kind = argv[0]
            return AppSpec(kind, port if port is not None else APP_PORTS[kind], tuple(argv[1:]))
        return AppSpec("command", port, tuple(argv))

    def _app_protocols(
        self, service: str, ports: dict[int, int], declared: dict[int, str]
    ) -> dict[int, AppProtocol]:
        if not isinstance(declared, dict):
            raise self.error(f"service {service!r}: app_protocols {declared!r} is not a mapping")
        found: dict[int, AppProtocol] = {}
        for port, value in declared.items():
            where = f"service {service!r}: app_protocols[{port!r}]"
            if port not in ports:
                raise self.error(f"{where}: not a port of the service (ports: {sorted(ports)})")
            protocol = normalize(value)
            if protocol is None:
                raise self.error(f"{where}: {value!r} is not one of {', '.join(APP_PROTOCOLS)}")
            found[port] = protocol
        return found

    def _policy_rule(self, policy: str, index: int, rule: dict[str, Any]) -> PolicyRule:
        unknown = set(rule) - RULE_FIELDS
        if unknown:
            raise self.error(
                f"policy {policy!r} rule {index}: unknown field(s) {sorted(unknown)}; "
                f"expected some of {sorted(RULE_FIELDS)}"
            )
        values: dict[str, tuple[Any, ...]] = {}
        for key, value in rule.items():
            items = tuple(value) if isinstance(value, list | tuple) else (value,)
            if key.endswith("ports") and not all(isinstance(p, int) for p in items):
                raise self.error(f"policy {policy!r} rule {index}: {key} must be integers")
            values[key] = items
        return PolicyRule(**values)


def plan(topology: Topology) -> Topology:
    """Run `build()`, validate, and assign addresses and interface names."""
    try:
        topology.build()
    except TopologyError:
        raise
    except Exception as exc:
        raise TopologyError(
            f"topology {topology.name}: build() raised {type(exc).__name__}: {exc}"
        ) from exc
    if not topology.nodes:
        raise topology.error("declares no nodes")
    if len(topology.nodes) > MAX_NODES:
        raise topology.error(f"{len(topology.nodes)} nodes; at most {MAX_NODES} are supported")
    hosts = iter(UNDERLAY.hosts())
    next(hosts)  # .0.1 stays free, like a docker bridge's gateway
    for index, node in enumerate(topology.nodes.values(), start=1):
        node.index = index
        node.underlay_ip = str(next(hosts))
        cidr = ipaddress.IPv4Network((int(POD_SUPERNET.network_address) + (index << 8), 24))
        node.pod_cidr = str(cidr)
        node.gateway_ip = str(cidr.network_address + 1)
    _assign_pods(topology)
    for offset, svc in enumerate(topology.services.values(), start=10):
        svc.vip = str(SERVICE_NET.network_address + offset)
    return topology


def _assign_pods(topology: Topology) -> None:
    per_node: dict[str, int] = {name: 0 for name in topology.nodes}
    for pod in topology.pods.values():
        node = topology.nodes[pod.node]
        count = per_node[pod.node]
        if count >= MAX_PODS_PER_NODE:
            raise topology.error(
                f"node {node.name} has more than {MAX_PODS_PER_NODE} pods (its pod CIDR is a /24)"
            )
        per_node[pod.node] = count + 1
        place_pod(node, pod, count)


def place_pod(node: NodeSpec, pod: PodSpec, index: int) -> None:
    """The `index`-th pod of a node: its address in the node's pod CIDR (.1 is the node's
    gateway), the name of its host-side veth, its uid."""
    pod.ip = str(ipaddress.IPv4Network(node.pod_cidr).network_address + 2 + index)
    pod.host_ifname = f"vp{index}"
    pod.uid = f"{pod.namespace}-{pod.name}"


def service_endpoints(topology: Topology, service: ServiceSpec) -> list[PodSpec]:
    return [
        pod
        for pod in topology.pods.values()
        if pod.namespace == service.namespace
        and all(pod.labels.get(k) == v for k, v in service.selector.items())
    ]
