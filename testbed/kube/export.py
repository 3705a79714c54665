"""`testbed export TOPO --out DIR`: a topology as Kubernetes manifests for Istio.

Core objects (Namespaces, ServiceAccounts, Deployments, Services) are built with the
official `kubernetes` client's models and validated against the Kubernetes API schemas of
KUBERNETES_VERSION (kubernetes-validate); Istio and Gateway API objects come from
testbed.kube.istio and are re-validated by their typed models. A kustomization.yaml ties the
files together and README.md names everything the manifests cannot carry.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import yaml
from kubernetes import client as k8s
from typing_extensions import Unpack

from testbed.cluster.model import ROOT_NAMESPACE, PodSpec, ServiceSpec, Topology, service_endpoints
from testbed.kube import istio
from testbed.kube import resources as r
from testbed.netlab.errors import TestbedError

KUBERNETES_VERSION = "1.35.0"  # the API schemas every core manifest is validated against
DEFAULT_IMAGE = "ambient-testbed:latest"  # built by the user from the exported Containerfile
POD_LABEL = "testbed.io/pod"
HOSTNAME_LABEL = "kubernetes.io/hostname"
SIDECAR_INJECTION = "istio-injection"
SIDECAR_INJECT_POD = "sidecar.istio.io/inject"
ExportMode = Literal["ambient", "sidecar"]
EXPORT_MODES: tuple[ExportMode, ...] = ("ambient", "sidecar")
# The servers testbed.measure runs, by the port it runs them on: what a pod serves on Kubernetes.
APPS: dict[int, tuple[str, list[str]]] = {
    5201: ("iperf3", ["iperf3", "-s", "-p", "5201"]),
    11111: ("sockperf", ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", "11111"]),
    7777: ("rr", ["python3", "-m", "testbed.workloads.rr", "server", "--port", "7777"]),
    8080: ("http-echo", ["python3", "-m", "testbed.workloads.http_echo", "--port", "8080"]),
}
HTTP_PORTS = frozenset({8080})


class ExportError(TestbedError, ValueError):
    """A bad node map or a manifest that does not validate (a bug, named with its object)."""


@dataclass
class Manifests:
    """Files of an export in `mode`: name -> documents, plus the README's notes."""

    mode: ExportMode
    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, filename: str, documents: Sequence[dict[str, Any]]) -> None:
        if documents:
            self.files.setdefault(filename, []).extend(documents)


def parse_node_map(text: str | None, topology: Topology) -> dict[str, str]:
    """'node1=worker-a,node2=worker-b' -> mapping; every name must be a topology node."""
    mapping: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        node, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not node or not target:
            raise ExportError(f"--node-map {item!r}: expected NODE=KUBERNETES_NODE")
        if node not in topology.nodes:
            raise ExportError(
                f"--node-map {item!r}: {node!r} is not a node of topology {topology.name} "
                f"(nodes: {', '.join(topology.nodes)})"
            )
        mapping[node] = target
    return mapping


def _serialize(obj: Any) -> dict[str, Any]:
    data: dict[str, Any] = k8s.ApiClient().sanitize_for_serialization(obj)
    return data


@functools.cache
def _schema_validator(api_version: str, kind: str) -> Any:
    """kubernetes-validate's strict schema of one kind at KUBERNETES_VERSION, loaded once
    (its validate() reloads the shared definitions on every call: minutes for 1000 pods)."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # apps/v1 -> apps-v1
    schema = schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validated_core(obj: Any) -> dict[str, Any]:
    """A kubernetes client model as a dict, checked against the fixed API version."""
    import jsonschema

    data = _serialize(obj)
    try:
        _schema_validator(data["apiVersion"], data["kind"]).validate(data)
    except jsonschema.ValidationError as exc:
        what = f"{data.get('kind')} {data.get('metadata', {}).get('name')}"
        path = ".".join(str(p) for p in exc.absolute_path)
        raise ExportError(
            f"{what} does not validate against Kubernetes {KUBERNETES_VERSION}: "
            f"{path}: {exc.message}"
        ) from None
    return data


def validated_istio(resource: r.IstioResource) -> dict[str, Any]:
    data = resource.dump()
    type(resource).model_validate(data)  # what we write must read back through the model
    return data


# ---------------------------------------------------------------- core objects


def _is_waypoint(topology: Topology, pod: PodSpec) -> bool:
    return f"{pod.namespace}/{pod.name}" in istio.waypoint_keys(topology)


def namespaces(topology: Topology, mode: ExportMode) -> list[Any]:
    names = sorted(
        {p.namespace for p in topology.pods.values()}
        | {s.namespace for s in topology.services.values()}
        | set(istio.namespace_labels(topology))
        | {p.namespace for p in topology.policies.values()}
    )
    made = []
    for name in names:
        if name == ROOT_NAMESPACE:
            continue  # Istio's own namespace: exists wherever Istio is installed
        labels = (
            {istio.DATAPLANE_MODE: "ambient"}
            if mode == "ambient"
            else {SIDECAR_INJECTION: "enabled"}
        )
        labels.update(istio.namespace_labels(topology).get(name, {}) if mode == "ambient" else {})
        meta = k8s.V1ObjectMeta(name=name, labels=labels)
        made.append(k8s.V1Namespace(api_version="v1", kind="Namespace", metadata=meta))
    return made


def service_accounts(pods: Sequence[PodSpec]) -> list[Any]:
    accounts = sorted({(p.namespace, p.service_account) for p in pods})
    return [
        k8s.V1ServiceAccount(
            api_version="v1",
            kind="ServiceAccount",
            metadata=k8s.V1ObjectMeta(name=sa, namespace=ns),
        )
        for ns, sa in accounts
    ]


def served_ports(topology: Topology) -> dict[str, list[int]]:
    """Pod name -> the target ports of the services that select it."""
    ports: dict[str, set[int]] = {name: set() for name in topology.pods}
    for svc in topology.services.values():
        for pod in service_endpoints(topology, svc):
            ports[pod.name].update(svc.ports.values())
    return {name: sorted(found) for name, found in ports.items()}


def containers(pod: PodSpec, ports: list[int], image: str) -> tuple[list[Any], list[int]]:
    """One container per app the pod serves on `ports` (or an idle one); and the ports with
    no app."""
    made, unknown = [], []
    for port in ports:
        if port not in APPS:
            unknown.append(port)
            continue
        name, command = APPS[port]
        if name == "http-echo":
            command = [*command, "--name", pod.name]
        if pod.app is not None and (pod.app.kind, pod.app.port) == (name, port):
            command = [*command, *pod.app.argv]  # the declared app's own arguments
        made.append(
            k8s.V1Container(
                name=name,
                image=image,
                command=command,
                ports=[k8s.V1ContainerPort(container_port=port, protocol="TCP")],
            )
        )
    if not made:  # a client: commands run in it with kubectl exec, as with testbed exec
        made.append(k8s.V1Container(name="client", image=image, command=["sleep", "infinity"]))
    return made, unknown


def deployment(
    pod: PodSpec, ports: list[int], mode: ExportMode, node_map: Mapping[str, str], image: str
) -> tuple[Any, list[int]]:
    labels = {**pod.labels, POD_LABEL: pod.name}
    if mode == "sidecar" and pod.labels.get(istio.DATAPLANE_MODE) == "none":
        labels[SIDECAR_INJECT_POD] = "false"
    made, unknown = containers(pod, ports, image)
    template = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels),
        spec=k8s.V1PodSpec(
            service_account_name=pod.service_account,
            node_selector={HOSTNAME_LABEL: node_map.get(pod.node, pod.node)},
            containers=made,
        ),
    )
    obj = k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=k8s.V1ObjectMeta(name=pod.name, namespace=pod.namespace, labels=labels),
        spec=k8s.V1DeploymentSpec(
            replicas=1,
            selector=k8s.V1LabelSelector(match_labels={POD_LABEL: pod.name}),
            template=template,
        ),
    )
    return obj, unknown


def service(svc: ServiceSpec) -> Any:
    def app_protocol(port: int, target: int) -> str | None:
        # the declared appProtocol; undeclared: http for the HTTP echo app's port
        return svc.app_protocols.get(port) or ("http" if target in HTTP_PORTS else None)

    ports = [
        k8s.V1ServicePort(
            name=f"{app_protocol(port, target) or 'tcp'}-{port}",
            port=port,
            target_port=target,
            protocol="TCP",
            app_protocol=app_protocol(port, target),
        )
        for port, target in sorted(svc.ports.items())
    ]
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(
            name=svc.name, namespace=svc.namespace, labels=svc.labels or None
        ),
        spec=k8s.V1ServiceSpec(selector=dict(svc.selector), ports=ports),
    )


# ---------------------------------------------------------------- the export


def build_manifests(
    topology: Topology,
    *,
    mode: ExportMode = "ambient",
    node_map: Mapping[str, str] | None = None,
    image: str = DEFAULT_IMAGE,
) -> Manifests:
    """The manifests of a planned topology."""
    nodes = dict(node_map or {})
    out = Manifests(mode)
    apps = [p for p in topology.pods.values() if not _is_waypoint(topology, p)]
    out.add("namespaces.yaml", [validated_core(n) for n in namespaces(topology, mode)])
    out.add("serviceaccounts.yaml", [validated_core(s) for s in service_accounts(apps)])
    deployments = []
    served = served_ports(topology)
    for pod in apps:
        obj, unknown = deployment(pod, served[pod.name], mode, nodes, image)
        deployments.append(validated_core(obj))
        out.notes += [
            f"pod {pod.namespace}/{pod.name}: nothing known serves port {port} (a service "
            "targets it); the pod runs no app for it"
            for port in unknown
        ]
    out.add("deployments.yaml", deployments)
    out.add("services.yaml", [validated_core(service(s)) for s in topology.services.values()])
    exported = istio.export_topology(topology)
    out.notes += exported.notes
    if mode == "ambient":
        out.add("waypoints.yaml", [validated_istio(g) for g in exported.gateways])
        out.add("httproutes.yaml", [validated_istio(x) for x in exported.routes])
    elif exported.gateways or exported.routes:
        out.notes.append(
            "mode sidecar: the topology's waypoints, their HTTPRoutes and the L7 policies that "
            "target them are ambient-only and were not exported"
        )
    policies = [p for p in exported.policies if mode == "ambient" or not p.spec.target_refs]
    out.add("authorizationpolicies.yaml", [validated_istio(p) for p in policies])
    out.notes += shaping_notes(topology)
    out.notes += _unmapped_nodes(topology, nodes)
    return out


def shaping_notes(topology: Topology) -> list[str]:
    notes = [
        f"node {n.name}: link shaping (rate={n.link.rate}, delay={n.link.delay}, "
        f"loss={n.link.loss}) has no Kubernetes equivalent; a real cluster has its own links"
        for n in topology.nodes.values()
        if n.link.shaped
    ]
    if len(topology.bridges) > 1 or topology.bridge_links:
        notes.append(
            f"underlay: the topology's bridges {topology.bridges} and their links are the "
            "cluster network's business on Kubernetes; not exported"
        )
    return notes


def _unmapped_nodes(topology: Topology, node_map: Mapping[str, str]) -> list[str]:
    missing = [n for n in topology.nodes if n not in node_map]
    if not missing:
        return []
    return [
        f"nodes {', '.join(missing)}: not in --node-map, so their pods are pinned to "
        f"Kubernetes nodes of the same name ({HOSTNAME_LABEL})"
    ]


def write_folder(out: Path, texts: Mapping[str, str]) -> list[Path]:
    """Write each named text into the folder `out` (made when missing); returns the files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot be made a folder: {exc.strerror}") from None
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in texts]


def dump_documents(documents: Sequence[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True)


def readme_text(topology: Topology, manifests: Manifests) -> str:
    mode = manifests.mode
    dataplane = "ambient (istio-cni, ztunnel)" if mode == "ambient" else "sidecar injection"
    lines = [
        f"# Topology {topology.name} for Kubernetes with Istio ({mode})",
        "",
        "Written by `testbed export`. Apply it with `kubectl apply -k .` on a cluster with",
        f"Istio {dataplane} and the Gateway API CRDs installed. The apps' image is",
        "the project's own, built from the Containerfile `testbed export-experiment` writes.",
        "",
        "## What these manifests do not carry",
        "",
        "- Addresses: pod IPs and service VIPs are the cluster's; the testbed's are not kept.",
        "- The testbed's redirection modes other than ambient and sidecar (legacy, ebpf, and the",
        "  inpod variants) have no Kubernetes equivalent: Istio ambient is in-pod redirection.",
        *[f"- {note}" for note in manifests.notes],
        "",
        "## Files",
        "",
        *[f"- {name}" for name in manifests.files],
        "",
    ]
    return "\n".join(lines)


class ExportOptions(TypedDict, total=False):
    """The keyword options of `write_export`; build_manifests gives the defaults."""

    mode: ExportMode
    node_map: Mapping[str, str] | None
    image: str


def write_export(topology: Topology, out: Path, **options: Unpack[ExportOptions]) -> list[Path]:
    """Write the manifests, kustomization.yaml and README.md into `out`; returns the files."""
    manifests = build_manifests(topology, **options)
    texts = {name: dump_documents(documents) for name, documents in manifests.files.items()}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(manifests.files),
    }
    texts["kustomization.yaml"] = yaml.safe_dump(kustomization, sort_keys=False)
    texts["README.md"] = readme_text(topology, manifests)
    return write_folder(out, texts)
