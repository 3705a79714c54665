import math

import pytest

from testbed.mesh.metrics import (
    TRAFFIC_LABEL_NAMES,
    Counter,
    Gauge,
    Histogram,
    Registry,
    TcpMetrics,
    TrafficLabels,
    format_value,
)


def test_counter_and_gauge_render_exactly() -> None:
    registry = Registry()
    requests = registry.register(
        Counter("app_requests_total", "Requests\nserved \\ so far", ["code", "path"])
    )
    requests.labels(code="200", path="/").inc()
    requests.labels(code="200", path="/").inc(2)
    requests.labels(code="500", path='/a"b\\c\nd').inc(0.5)
    inflight = registry.register(Gauge("app_inflight", "In flight"))
    inflight.labels().inc(3)
    inflight.labels().dec()
    assert registry.render() == (
        "# HELP app_requests_total Requests\\nserved \\\\ so far\n"
        "# TYPE app_requests_total counter\n"
        'app_requests_total{code="200",path="/"} 3\n'
        'app_requests_total{code="500",path="/a\\"b\\\\c\\nd"} 0.5\n'
        "# HELP app_inflight In flight\n"
        "# TYPE app_inflight gauge\n"
        "app_inflight 2\n"
    )


def test_histogram_renders_cumulative_buckets() -> None:
    registry = Registry()
    latency = registry.register(
        Histogram("rpc_seconds", "RPC latency", ["method"], buckets=[0.1, 1, 0.5])
    )
    child = latency.labels(method="GET")
    for value in (0.05, 0.1, 0.3, 2.0):
        child.observe(value)
    assert registry.render() == (
        "# HELP rpc_seconds RPC latency\n"
        "# TYPE rpc_seconds histogram\n"
        'rpc_seconds_bucket{method="GET",le="0.1"} 2\n'
        'rpc_seconds_bucket{method="GET",le="0.5"} 3\n'
        'rpc_seconds_bucket{method="GET",le="1"} 3\n'
        'rpc_seconds_bucket{method="GET",le="+Inf"} 4\n'
        'rpc_seconds_sum{method="GET"} 2.45\n'
        'rpc_seconds_count{method="GET"} 4\n'
    )


def test_misuse_is_rejected() -> None:
    counter = Counter("c_total", "c", ["a"])
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels(b="x")
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels(a="x").inc(-1)
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "h", ["le"])
    registry = Registry()
    registry.register(counter)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("c_total", "again"))


def test_format_value() -> None:
    assert [format_value(v) for v in (1.0, 0.25, 1e20, math.inf, -math.inf)] == [
        "1",
        "0.25",
        "1e+20",
        "+Inf",
        "-Inf",
    ]
    assert format_value(math.nan) == "NaN"


def test_tcp_metrics_count_a_denied_connection_like_ztunnel() -> None:
    registry = Registry()
    tcp = TcpMetrics.register(registry)
    labels = TrafficLabels(
        reporter="destination",
        source_principal="spiffe://cluster.local/ns/default/sa/sleep",
        destination_workload="httpbin",
        connection_security_policy="mutual_tls",
    )
    ok = tcp.connection(labels)
    ok.received(100)
    ok.sent(2048)
    ok.close()
    denied = tcp.connection(labels)
    denied.close("DENY")
    denied.close("DENY")  # counted once

    values = labels.as_labels()
    deny_values = {**values, "response_flags": "DENY"}
    assert tcp.opened.labels(**values).value == 2
    assert tcp.closed.labels(**values).value == 1
    assert tcp.closed.labels(**deny_values).value == 1
    assert tcp.failed.labels(**deny_values).value == 1
    assert (tcp.sent_bytes.labels(**values).value, tcp.received_bytes.labels(**values).value) == (
        2048,
        100,
    )
    text = registry.render()
    assert "# TYPE istio_tcp_connections_opened_total counter\n" in text
    expected_line = (
        'istio_tcp_connections_failed_total{reporter="destination",source_workload="unknown",'
        'source_canonical_service="unknown",source_canonical_revision="unknown",'
        'source_workload_namespace="unknown",'
        'source_principal="spiffe://cluster.local/ns/default/sa/sleep",source_app="unknown",'
        'source_version="unknown",source_cluster="unknown",destination_service="unknown",'
        'destination_service_namespace="unknown",destination_service_name="unknown",'
        'destination_workload="httpbin",destination_canonical_service="unknown",'
        'destination_canonical_revision="unknown",destination_workload_namespace="unknown",'
        'destination_principal="unknown",destination_app="unknown",destination_version="unknown",'
        'destination_cluster="unknown",request_protocol="tcp",response_flags="DENY",'
        'connection_security_policy="mutual_tls"} 1\n'
    )
    assert expected_line in text


def test_traffic_labels_cover_istio_standard_names() -> None:
    standard = {
        "reporter",
        "source_principal",
        "source_workload",
        "source_workload_namespace",
        "destination_principal",
        "destination_workload",
        "destination_workload_namespace",
        "destination_service",
        "request_protocol",
        "response_flags",
        "connection_security_policy",
    }
    assert standard <= set(TRAFFIC_LABEL_NAMES)
