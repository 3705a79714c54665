"""ztunnel's traffic labels for a connection, from the workloads at both ends."""

from __future__ import annotations

from typing import Literal

from testbed.mesh.config import Service, Workload
from testbed.mesh.metrics import ConnectionMetrics, TcpMetrics, TrafficLabels
from testbed.mesh.proxy.telemetry import UNKNOWN, endpoint_labels, service_labels
from testbed.mesh.ztunnel.netio import ByteMeter

Reporter = Literal["source", "destination"]


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
    values = {**endpoint_labels(source, destination), **service_labels(service)}
    if destination is not None and destination.protocol == "HBONE":
        values["destination_principal"] = destination.identity.uri
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
