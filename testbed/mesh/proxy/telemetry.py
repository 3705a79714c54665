"""The traffic labels every proxy derives from the workloads and service of a connection,
as Istio's proxies name them (`source_workload`, `destination_canonical_service`, ...)."""

from __future__ import annotations

from testbed.mesh.config import Service, Workload

UNKNOWN = "unknown"


def workload_labels(side: str, workload: Workload | None) -> dict[str, str]:
    """`<side>_workload`, `_workload_namespace`, `_canonical_service`, ... of one end."""
    if workload is None:
        return {}
    return {
        f"{side}_workload": workload.workload_name or workload.name or UNKNOWN,
        f"{side}_workload_namespace": workload.namespace,
        f"{side}_canonical_service": workload.canonical_name or UNKNOWN,
        f"{side}_canonical_revision": workload.canonical_revision or UNKNOWN,
        f"{side}_app": workload.canonical_name or UNKNOWN,
        f"{side}_version": workload.canonical_revision or UNKNOWN,
        f"{side}_cluster": workload.cluster_id or UNKNOWN,
    }


def service_labels(service: Service | None) -> dict[str, str]:
    if service is None:
        return {}
    return {
        "destination_service": service.hostname,
        "destination_service_name": service.name,
        "destination_service_namespace": service.namespace,
    }


def endpoint_labels(source: Workload | None, destination: Workload | None) -> dict[str, str]:
    return {**workload_labels("source", source), **workload_labels("destination", destination)}
