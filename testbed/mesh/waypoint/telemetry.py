"""The waypoint's request metrics (Istio's standard HTTP metrics) and access log line.

`istio_requests_total` and `istio_request_duration_milliseconds` carry the traffic labels
ztunnel uses plus `response_code`, with reporter "waypoint" and request_protocol "http", as
Istio's waypoints report them. Durations use Istio's default buckets (ms).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace

from testbed.mesh.config import Service, Workload
from testbed.mesh.metrics import (
    TRAFFIC_LABEL_NAMES,
    Counter,
    CounterChild,
    Histogram,
    HistogramChild,
    Registry,
    TrafficLabels,
)
from testbed.mesh.proxy.telemetry import UNKNOWN, endpoint_labels, service_labels

REQUEST_LABEL_NAMES = (*TRAFFIC_LABEL_NAMES, "response_code")
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip


def request_labels(
    *,
    reporter: str = "waypoint",
    source: Workload | None,
    source_principal: str | None,
    service: Service | None,
    destination: Workload | None,
) -> TrafficLabels:
    values = {**endpoint_labels(source, destination), **service_labels(service)}
    if destination is not None:
        values["destination_principal"] = destination.identity.uri
    return TrafficLabels(
        reporter=reporter,
        source_principal=source_principal or UNKNOWN,
        request_protocol="http",
        connection_security_policy="mutual_tls",
        **values,
    )


@dataclass(frozen=True)
class RequestMetrics:
    requests: Counter
    duration: Histogram
    # (labels, status, flags) -> the children: resolved once, requests repeat them
    _children: dict[tuple[TrafficLabels, int, str], tuple[CounterChild, HistogramChild]] = field(
        default_factory=dict
    )

    @classmethod
    def register(cls, registry: Registry) -> RequestMetrics:
        return cls(
            registry.register(
                Counter("istio_requests_total", "Total requests handled", REQUEST_LABEL_NAMES)
            ),
            registry.register(
                Histogram(
                    "istio_request_duration_milliseconds",
                    "Request duration in milliseconds",
                    REQUEST_LABEL_NAMES,
                    DURATION_BUCKETS_MS,
                )
            ),
        )

    def record(self, labels: TrafficLabels, status: int, flags: str, duration_ms: float) -> None:
        key = (labels, status, flags)
        children = self._children.get(key)
        if children is None:
            values = replace(labels, response_flags=flags).as_labels()
            values["response_code"] = str(status)
            children = self._children[key] = (
                self.requests.labels(**values),
                self.duration.labels(**values),
            )
        children[0].inc()
        children[1].observe(duration_ms)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as Envoy's default access log format writes it:

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

    (one line; a value that is absent is "-").
    """

    start: datetime.datetime
    method: str
    path: str  # as the client sent it (before any rewrite)
    protocol: str
    status: int
    flags: str
    bytes_received: int
    bytes_sent: int
    duration_ms: float
    upstream_service_time: str | None
    forwarded_for: str | None
    user_agent: str | None
    request_id: str | None
    authority: str
    upstream_host: str

    def line(self) -> str:
        def text(value: str | None) -> str:
            return value or "-"

        return (
            f"[{self.start.isoformat(timespec='milliseconds')}] "
            f'"{self.method} {self.path} {self.protocol}" {self.status} {self.flags} '
            f"{self.bytes_received} {self.bytes_sent} {round(self.duration_ms)} "
            f"{text(self.upstream_service_time)} "
            f'"{text(self.forwarded_for)}" "{text(self.user_agent)}" "{text(self.request_id)}" '
            f'"{self.authority}" "{self.upstream_host}"'
        )
