"""A small Prometheus registry (text exposition format 0.0.4) and ztunnel's TCP metrics.

ztunnel's TCP metric families and labels follow its src/proxy/metrics.rs. A connection is
counted as opened when it is accepted (response_flags "-"), and as closed when it ends with the
flag that says how: "-" for success, "DENY" for an authorization denial, "CONNECT" for an
upstream failure, and so on. Closed connections with a failure flag are also counted in
`istio_tcp_connections_failed_total`; that is how ztunnel reports policy denials too (there is no
separate deny metric), so count denials with `ConnectionMetrics.close("DENY")`.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def format_value(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _render_labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs) + "}"


class CounterChild:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; cannot add {amount}")
        with self._lock:
            self.value += amount

    def samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        yield "", (), self.value


class GaugeChild:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        yield "", (), self.value


class HistogramChild:
    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._upper_bounds = upper_bounds  # ends with +Inf
        self._counts = [0] * len(upper_bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._upper_bounds, value)
        with self._lock:
            self._counts[index] += 1
            self.sum += value
            self.count += 1

    def samples(self) -> Iterator[tuple[str, Sequence[tuple[str, str]], float]]:
        cumulative = 0
        for bound, count in zip(self._upper_bounds, self._counts, strict=True):
            cumulative += count
            yield "_bucket", (("le", format_value(bound)),), cumulative
        yield "_sum", (), self.sum
        yield "_count", (), self.count


Child = TypeVar("Child", CounterChild, GaugeChild, HistogramChild)


class Metric(Generic[Child]):
    """A metric family: one child per combination of label values."""

    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        self._lock = threading.Lock()

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, **values: str) -> Child:
        """The child for these label values (all label names, no others); keep it if hot."""
        if values.keys() != set(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {sorted(self.labelnames)}, got {sorted(values)}"
            )
        key = tuple(str(values[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for key, child in list(self._children.items()):
            base = tuple(zip(self.labelnames, key, strict=True))
            for suffix, extra, value in child.samples():
                labels = _render_labels(base + tuple(extra))
                lines.append(f"{self.name}{suffix}{labels} {format_value(value)}")
        return "\n".join(lines) + "\n"


class Counter(Metric[CounterChild]):
    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()


class Gauge(Metric[GaugeChild]):
    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()


class Histogram(Metric[HistogramChild]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ):
        super().__init__(name, help, labelnames)
        if "le" in self.labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        bounds = sorted(set(buckets) - {math.inf})
        self.upper_bounds = (*bounds, math.inf)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.upper_bounds)


AnyMetric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, AnyMetric] = {}

    def register(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        return "".join(m.render() for m in list(self._metrics.values()))


@dataclass(frozen=True)
class TrafficLabels:
    """ztunnel's CommonTrafficLabels (without locality); an unknown value is "unknown"."""

    reporter: str = "source"  # or "destination"
    source_workload: str = "unknown"
    source_canonical_service: str = "unknown"
    source_canonical_revision: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"  # spiffe://... of the mTLS peer
    source_app: str = "unknown"
    source_version: str = "unknown"
    source_cluster: str = "unknown"
    destination_service: str = "unknown"  # the service hostname
    destination_service_namespace: str = "unknown"
    destination_service_name: str = "unknown"
    destination_workload: str = "unknown"
    destination_canonical_service: str = "unknown"
    destination_canonical_revision: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    destination_app: str = "unknown"
    destination_version: str = "unknown"
    destination_cluster: str = "unknown"
    request_protocol: str = "tcp"
    response_flags: str = "-"  # or DENY, CONNECT, TLS_FAILURE, ...
    connection_security_policy: str = "unknown"  # or "mutual_tls"

    def as_labels(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in TRAFFIC_LABEL_NAMES}


TRAFFIC_LABEL_NAMES = tuple(f.name for f in fields(TrafficLabels))


@dataclass(frozen=True)
class TcpMetrics:
    opened: Counter
    closed: Counter
    failed: Counter
    sent_bytes: Counter
    received_bytes: Counter

    @classmethod
    def register(cls, registry: Registry) -> TcpMetrics:
        def counter(name: str, help: str) -> Counter:
            return registry.register(Counter(name, help, TRAFFIC_LABEL_NAMES))

        return cls(
            opened=counter(
                "istio_tcp_connections_opened_total", "The total number of TCP connections opened"
            ),
            closed=counter(
                "istio_tcp_connections_closed_total", "The total number of TCP connections closed"
            ),
            failed=counter(
                "istio_tcp_connections_failed_total",
                "The total number of TCP connections that failed to establish (unstable)",
            ),
            sent_bytes=counter(
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during response in case of a TCP connection",
            ),
            received_bytes=counter(
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request in case of a TCP connection",
            ),
        )

    def connection(self, labels: TrafficLabels) -> ConnectionMetrics:
        """Count a connection as opened; the result counts its bytes and its close."""
        return ConnectionMetrics(self, labels)


class ConnectionMetrics:
    """Per-connection handle; resolves its counter children once, not per byte count."""

    def __init__(self, metrics: TcpMetrics, labels: TrafficLabels):
        self._metrics = metrics
        self._labels = labels
        values = labels.as_labels()
        metrics.opened.labels(**values).inc()
        self._sent = metrics.sent_bytes.labels(**values)
        self._received = metrics.received_bytes.labels(**values)
        self._closed = False

    def sent(self, n: int) -> None:
        self._sent.inc(n)

    def received(self, n: int) -> None:
        self._received.inc(n)

    def close(self, response_flags: str = "-") -> None:
        """Count the close once, with the flag saying how it ended ("-" is success)."""
        if self._closed:
            return
        self._closed = True
        values = {**self._labels.as_labels(), "response_flags": response_flags}
        self._metrics.closed.labels(**values).inc()
        if response_flags != "-":
            self._metrics.failed.labels(**values).inc()
