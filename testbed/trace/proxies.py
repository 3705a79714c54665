"""What the proxies say about a connection: their `GET /connections` records (admin port
15000, the record format every proxy of the testbed serves), or, from proxies without
that endpoint, the deltas of their Prometheus TCP metrics (15020), which are per label
set and not per connection."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from testbed.netlab import Netns
from testbed.netlab.errors import TestbedError
from testbed.netlab.http import http_get as netns_http_get

ADMIN_PORT = 15000
METRICS_PORT = 15020
HTTP_TIMEOUT = 2.0
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": int,
    "proxy": str,
    "listener": int,
    "direction": str,
    "path": str,
    "verdict": str,
    "bytes_sent": int,
    "bytes_received": int,
    "opened": (int, float),
}
_OPTIONAL = (
    "peer",
    "original_dst",
    "src_identity",
    "dst_identity",
    "connect_target",
    "upstream",
    "reason",
    "closed",
)
_TCP_METRICS = (
    "istio_requests_total",  # a waypoint's (L7) count
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_connections_failed_total",
)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+([0-9.eE+-]+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class RecordError(TestbedError, ValueError):
    """A /connections body that does not follow the record format."""


@dataclass(frozen=True)
class ProxyRecord:
    id: int
    proxy: str
    listener: int
    direction: str
    path: str
    verdict: str
    bytes_sent: int
    bytes_received: int
    opened: float
    peer: str | None = None  # the proxy may not know them (a refused connection)
    original_dst: str | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    connect_target: str | None = None
    upstream: str | None = None
    reason: str | None = None
    closed: float | None = None


def parse_connections(body: str) -> list[ProxyRecord]:
    """Records of a `GET /connections` body; RecordError names the first bad field."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RecordError(f"/connections: not JSON ({exc})") from None
    items = data.get("connections") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise RecordError('/connections: expected {"connections": [...]}')
    records = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(f"/connections: connections[{index}] is not an object")
        for name, kind in _REQUIRED.items():
            if not isinstance(item.get(name), kind):
                raise RecordError(
                    f"/connections: connections[{index}].{name}: expected {_kind_name(kind)},"
                    f" got {item.get(name)!r}"
                )
        values = {name: item[name] for name in _REQUIRED}
        for name in _OPTIONAL:
            value = item.get(name)
            if value is not None and not isinstance(value, str | int | float):
                raise RecordError(f"/connections: connections[{index}].{name}: got {value!r}")
            values[name] = value
        records.append(ProxyRecord(**values))
    return records


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def http_get(netns: Netns, port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET http://host:port/path inside `netns`: (status, body text); OSError if nothing answers."""
    status, body = netns_http_get(netns, port, path, host=host, timeout=HTTP_TIMEOUT)
    return status, body.decode("utf-8", errors="replace")


@dataclass
class ProxyView:
    """What one proxy (in one namespace) showed: records, or metrics as a fallback."""

    records: list[ProxyRecord] | None = None  # None: it serves no /connections
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.records is not None or bool(self.metrics)


def read_proxy(netns: Netns, since: int = 0) -> ProxyView:
    """The proxy serving admin/metrics in `netns`, if any; records after id `since`."""
    view = ProxyView()
    try:
        status, body = http_get(netns, ADMIN_PORT, f"/connections?since={since}")
        if status == 200:
            view.records = parse_connections(body)
    except (OSError, RecordError):
        pass
    if view.records is None:
        try:
            status, body = http_get(netns, METRICS_PORT, "/metrics")
            if status == 200:
                view.metrics = parse_tcp_metrics(body)
        except OSError:
            pass
    return view


def parse_tcp_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The TCP connection counters of a Prometheus text page, by (name, labels)."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) not in _TCP_METRICS:
            continue
        labels = tuple(sorted(_LABEL.findall(match.group(3) or "")))
        samples[(match.group(1), labels)] = float(match.group(4))
    return samples


@dataclass(frozen=True)
class MetricDelta:
    name: str
    labels: dict[str, str]
    delta: float


def metric_deltas(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> list[MetricDelta]:
    found = []
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta > 0:
            found.append(MetricDelta(key[0], dict(key[1]), delta))
    return found


def new_records(before: Iterable[ProxyRecord], after: Iterable[ProxyRecord]) -> list[ProxyRecord]:
    seen = {record.id for record in before}
    return [record for record in after if record.id not in seen]


def belongs_to(
    record: ProxyRecord,
    *,
    client: str,
    destinations: set[str],
    window: tuple[float, float],
    request_bytes: int,
) -> bool:
    """Whether a record is this trace's: its TCP peer is the client socket (first proxy),
    or it was opened while the trace ran, towards one of its destinations, and carried the
    trace's own request size (the size differs per trace, which keeps simultaneous traces
    to one destination apart)."""
    if record.peer == client:
        return True
    started, ended = window
    if not started - 0.5 <= record.opened <= ended + 0.5:
        return False
    targets = {record.original_dst or "", record.connect_target or "", record.upstream or ""}
    if not targets & destinations:
        return False
    carried = (record.bytes_received, record.bytes_sent)
    # a refused connection carries nothing; an open one (another trace's, in flight) is
    # not counted yet and could belong to anyone
    return request_bytes in carried or (record.closed is not None and not any(carried))


def behind_l7(
    record: ProxyRecord, *, l7_ips: set[str], destinations: set[str], window: tuple[float, float]
) -> bool:
    """Whether a record is the hop after one of this trace's L7 proxies: its TCP peer is that
    proxy, it was opened while the trace ran, towards one of the trace's destinations."""
    peer_ip = (record.peer or "").rpartition(":")[0]
    started, ended = window
    targets = {record.original_dst or "", record.connect_target or "", record.upstream or ""}
    return (
        record.direction == "inbound"  # the hop after a proxy takes the connection it opened
        and peer_ip in l7_ips
        and started - 0.5 <= record.opened <= ended + 0.5
        and bool(targets & destinations)
    )


def record_summary(record: ProxyRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if v is not None}
