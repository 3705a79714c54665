"""`testbed export-experiment SPEC --out DIR`: an experiment spec as Kubernetes Jobs.

Per placement of the spec: a server Deployment (the four servers testbed.measure uses) and
its Service, pinned to the node of the topology's role=server pod for that placement, and a
Job pinned to the node of its role=client pod that runs the placement's cases one after
another with `python -m testbed.kube.job` (the same workload code and case parameters as
`testbed run`), printing rows as JSON lines. Cases get the testbed mode that matches the
cluster's data plane (ambient: inpod, sidecar: sidecar, none: none), so `testbed compare`
lines them up with a local run. A Containerfile builds the image (the user builds it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from kubernetes import client as k8s

from testbed.cluster.loader import load_topology
from testbed.cluster.model import PodSpec, Topology, plan
from testbed.experiment.cases import mode_cases
from testbed.experiment.spec import ExperimentSpec, ModeSpec, load_spec
from testbed.kube.export import (
    APPS,
    DEFAULT_IMAGE,
    HOSTNAME_LABEL,
    SIDECAR_INJECTION,
    ExportError,
    dump_documents,
    validated_core,
    write_folder,
)
from testbed.kube.istio import DATAPLANE_MODE
from testbed.redirect import available_modes

ClusterMode = Literal["ambient", "sidecar", "none"]
CLUSTER_MODES: dict[str, str] = {"ambient": "inpod", "sidecar": "sidecar", "none": "none"}
RUN_ID = "kubernetes"  # `testbed import` replaces it with the results directory's name
CONTAINERFILE = """\
# The image of the exported experiment: the project with the tools its measurements run.
# Build it from the repository root, e.g.
#   podman build -f {out}/Containerfile -t {image} .
# and push it where the cluster pulls from.
FROM docker.io/library/python:3.11-slim-bookworm
RUN apt-get update \\
 && apt-get install -y --no-install-recommends iperf3 sockperf iproute2 \\
 && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN pip install --no-cache-dir /src
"""


def dns_name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")


def placement_pair(topology: Topology, placement: str) -> tuple[PodSpec, PodSpec]:
    """role=client and role=server pods on the same or on different nodes (Cluster.pair's
    rule, on the model)."""
    pods = list(topology.pods.values())
    for client in (p for p in pods if p.labels.get("role") == "client"):
        for server in (p for p in pods if p.labels.get("role") == "server"):
            if (server.node == client.node) == (placement == "same-node"):
                return client, server
    raise ExportError(f"topology {topology.name} has no role=client/role=server pods {placement}")


def _namespace(name: str, mode: ClusterMode) -> Any:
    labels = {"ambient": {DATAPLANE_MODE: "ambient"}, "sidecar": {SIDECAR_INJECTION: "enabled"},
              "none": {DATAPLANE_MODE: "none"}}[mode]  # fmt: skip
    return k8s.V1Namespace(
        api_version="v1", kind="Namespace", metadata=k8s.V1ObjectMeta(name=name, labels=labels)
    )


def _server(name: str, namespace: str, node: str, image: str) -> list[Any]:
    labels = {"app": name}
    containers = [
        k8s.V1Container(
            name=app,
            image=image,
            command=[*command, "--name", name] if app == "http-echo" else command,
            ports=[k8s.V1ContainerPort(container_port=port)],
        )
        for port, (app, command) in sorted(APPS.items())
    ]
    deployment = k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
        spec=k8s.V1DeploymentSpec(
            replicas=1,
            selector=k8s.V1LabelSelector(match_labels=labels),
            template=k8s.V1PodTemplateSpec(
                metadata=k8s.V1ObjectMeta(labels=labels),
                spec=k8s.V1PodSpec(node_selector={HOSTNAME_LABEL: node}, containers=containers),
            ),
        ),
    )
    service = k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
        spec=k8s.V1ServiceSpec(
            selector=labels,
            ports=[k8s.V1ServicePort(name=f"tcp-{p}", port=p, target_port=p) for p in sorted(APPS)],
        ),
    )
    return [deployment, service]


def _job(
    name: str, namespace: str, node: str, image: str, server: str, cases: list[Any],
    context: Mapping[str, Any],
) -> Any:  # fmt: skip
    command = [
        "python3", "-m", "testbed.kube.job",
        "--server", f"{server}.{namespace}.svc.cluster.local",
        "--server-name", server,
        "--cases", json.dumps([c.parameters() for c in cases]),
        "--context", json.dumps(dict(context)),
    ]  # fmt: skip
    node_name = k8s.V1EnvVar(
        name="NODE_NAME",
        value_from=k8s.V1EnvVarSource(
            field_ref=k8s.V1ObjectFieldSelector(field_path="spec.nodeName")
        ),
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
        spec=k8s.V1JobSpec(
            backoff_limit=0,
            template=k8s.V1PodTemplateSpec(
                spec=k8s.V1PodSpec(
                    restart_policy="Never",
                    node_selector={HOSTNAME_LABEL: node},
                    containers=[
                        k8s.V1Container(
                            name="measure", image=image, command=command, env=[node_name]
                        )
                    ],
                )
            ),
        ),
    )


def write_experiment(
    spec_path: Path,
    out: Path,
    *,
    mode: ClusterMode = "ambient",
    node_map: Mapping[str, str] | None = None,
    image: str = DEFAULT_IMAGE,
) -> list[Path]:
    spec: ExperimentSpec = load_spec(spec_path, available_modes=available_modes)
    topology = plan(load_topology(spec.topology.as_argument()))
    nodes = dict(node_map or {})
    namespace = dns_name(f"testbed-{spec.name}")
    cases = mode_cases(spec, ModeSpec(mode=CLUSTER_MODES[mode]))
    context = {"experiment": spec.name, "run_id": RUN_ID,
               "topology": spec.topology.as_argument(), "pinning": spec.pinning}  # fmt: skip
    namespace_doc = validated_core(_namespace(namespace, mode))
    texts = {"namespace.yaml": yaml.safe_dump(namespace_doc, sort_keys=False)}
    for placement in spec.placements:
        client, server = placement_pair(topology, placement)
        server_name = dns_name(f"server-{placement}")
        objects = _server(server_name, namespace, nodes.get(server.node, server.node), image)
        chosen = [c for c in cases if c.placement == placement]
        objects.append(
            _job(
                dns_name(f"measure-{placement}"),
                namespace,
                nodes.get(client.node, client.node),
                image,
                server_name,
                chosen,
                context,
            )
        )
        texts[f"{placement}.yaml"] = dump_documents([validated_core(obj) for obj in objects])
    texts["Containerfile"] = CONTAINERFILE.format(out=out, image=image)
    texts["README.md"] = _readme(spec, namespace, mode, image)
    return write_folder(out, texts)


def _readme(spec: ExperimentSpec, namespace: str, mode: ClusterMode, image: str) -> str:
    steps = []
    for placement in spec.placements:
        job = dns_name(f"measure-{placement}")
        steps += [
            f"kubectl apply -f {placement}.yaml",
            f"kubectl -n {namespace} wait --for=condition=complete --timeout=1h job/{job}",
            f"kubectl -n {namespace} logs job/{job} -c measure > rows-{placement}.jsonl",
            f"kubectl -n {namespace} delete -f {placement}.yaml",
        ]
    return "\n".join(
        [
            f"# Experiment {spec.name} as Kubernetes Jobs ({mode})",
            "",
            f"Build the image `{image}` from the repository root with the Containerfile here,",
            "then, one placement at a time (so the placements do not load each other):",
            "",
            "```",
            "kubectl apply -f namespace.yaml",
            *steps,
            "cat rows-*.jsonl > rows.jsonl",
            f"testbed import rows.jsonl --name {spec.name}-k8s",
            "```",
            "",
            "Not carried over: link shaping, CPU pinning, proxy CPU/RSS sampling (the rows hold",
            f"what the workloads measure), and modes other than {mode}: every case is labelled "
            f"with the testbed mode `{CLUSTER_MODES[mode]}`.",
            "",
        ]
    )
