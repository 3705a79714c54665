"""ztunnel's traffic labels for a connection, from the workloads at both ends."""

from __future__ import annotations

from typing import Literal

from testbed.mesh.config import Service, Workload
from testbed.mesh.metrics import ConnectionMetrics, TcpMetrics, TrafficLabels
from testbed.mesh.ztunnel.netio import ByteMeter

UNKNOWN = "unknown"
Reporter = Literal["source", "destination"]


def _workload_labels(side: str, workload: Workload | None) -> dict[str, str]:
    if workload is None:
        return {}
    return {
        f"{side}_workload": workload.workload_name or workload.name,
        f"{side}_workload_namespace": workload.namespace,
        f"{side}_canonical_service": workload.canonical_name or UNKNOWN,
        f"{side}_canonical_revision": workload.canonical_revision or UNKNOWN,
        f"{side}_app": workload.canonical_name or UNKNOWN,
        f"{side}_version": workload.canonical_revision or UNKNOWN,
        f"{side}_cluster": workload.cluster_id or UNKNOWN,
    }


def traffic_labels(
    reporter: Reporter,
    *,
    source: Workload | None,
    source_principal: str | None,
    destination: Workload | None,
    service: Service | None = None,
    mutual_tls: bool,
) -> TrafficLabels:
    """Labels as ztunnel reports them; the destination principal is only known in the mesh."""
    values = {**_workload_labels("source", source), **_workload_labels("destination", destination)}
    if destination is not None and destination.protocol == "HBONE":
        values["destination_principal"] = destination.identity.uri
    if service is not None:
        values["destination_service"] = service.hostname
        values["destination_service_name"] = service.name
        values["destination_service_namespace"] = service.namespace
    return TrafficLabels(
        reporter=reporter,
        source_principal=source_principal or UNKNOWN,
        connection_security_policy="mutual_tls" if mutual_tls else UNKNOWN,
        **values,
    )


def record_close(connection: ConnectionMetrics, meter: ByteMeter, flags: str) -> None:
    """Count what the client socket carried (received = request bytes) and the close."""
    sent, received = meter.counts()
    connection.received(received)
    connection.sent(sent)
    connection.close(flags)


def count_denied(metrics: TcpMetrics, labels: TrafficLabels) -> None:
    """ztunnel counts a denied connection as opened and closed with the DENY flag."""
    metrics.connection(labels).close("DENY")
