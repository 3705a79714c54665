"""The waypoint's request pipeline against fake upstreams: failure handling, metrics, log."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hbone_support import run
from waypoint_support import CLIENT, CLIENT_ADDRESS, ENDPOINTS, local_config, service_key

from testbed.mesh.metrics import Registry
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.proxy import (
    Downstream,
    Endpoint,
    L7Proxy,
    UpstreamConnectError,
    resolve_target,
)
from testbed.mesh.waypoint.sniff import sniff
from testbed.mesh.waypoint.telemetry import RequestMetrics


class FakeUpstreams:
    """Answers per endpoint IP: an int is a status, an exception is raised, None hangs."""

    def __init__(self, behaviour: dict[str, Any]) -> None:
        self.behaviour = behaviour
        self.calls: list[str] = []

    async def exchange(self, endpoint: Endpoint, request: HttpRequest) -> HttpResponse:
        ip = str(endpoint[0].workload_ips[0])
        self.calls.append(ip)
        what = self.behaviour.get(ip, 200)
        if isinstance(what, Exception):
            raise what
        if what is None:
            await asyncio.sleep(3600)
        return HttpResponse(what, [("x-served-by", ip)], b"ok")


def make_proxy(l7: dict[str, Any], upstreams: FakeUpstreams) -> tuple[L7Proxy, Registry]:
    registry = Registry()
    proxy = L7Proxy(
        local_config(),
        WaypointConfig.model_validate(l7),
        upstreams,
        RequestMetrics.register(registry),
    )
    return proxy, registry


def handle(proxy: L7Proxy, vip: str, target: str = "/") -> HttpResponse:
    ip, port = vip.split(":")
    destination = resolve_target(proxy.mesh, (ip, int(port)))
    assert destination is not None
    downstream = Downstream(CLIENT.uri, CLIENT_ADDRESS, destination)
    return run(proxy.handle(downstream, HttpRequest("GET", target, "flaky", [])))


RETRY_CONNECT = {"retry": {"attempts": 1, "retryOn": ["connect-failure"]}}
FLAKY = {"routes": [{"name": "f", "parents": [service_key("flaky")], "rules": [RETRY_CONNECT]}]}


def test_connect_failures_are_retried_on_another_endpoint() -> None:
    upstreams = FakeUpstreams({ENDPOINTS["broken"]: UpstreamConnectError("refused")})
    proxy, registry = make_proxy(FLAKY, upstreams)
    statuses = {handle(proxy, "10.96.0.13:9080").status for _ in range(20)}
    assert statuses == {200}
    assert ENDPOINTS["broken"] in upstreams.calls  # it was tried, and hidden
    assert 'response_code="200"' in registry.render()


def test_5xx_is_not_retried_when_only_connect_failures_are() -> None:
    upstreams = FakeUpstreams({ENDPOINTS["broken"]: 503})
    proxy, _ = make_proxy(FLAKY, upstreams)
    assert 503 in {handle(proxy, "10.96.0.13:9080").status for _ in range(30)}


def test_reset_and_per_try_timeout_and_no_route() -> None:
    l7 = {"routes": [{"name": "r", "parents": [service_key("reviews-v1")], "rules": [
        {"matches": [{"path": {"value": "/hang"}}], "retry": {"perTryTimeout": 0.05}},
        {"matches": [{"path": {"value": "/reset"}}]},
    ]}]}  # fmt: skip
    upstreams = FakeUpstreams({ENDPOINTS["r1"]: ConnectionResetError("gone")})
    proxy, registry = make_proxy(l7, upstreams)
    reset = handle(proxy, "10.96.0.11:9080", "/reset")
    assert (reset.status, reset.flags) == (503, "UC")
    upstreams.behaviour[ENDPOINTS["r1"]] = None
    hung = handle(proxy, "10.96.0.11:9080", "/hang")
    assert (hung.status, hung.flags) == (504, "UT")
    unrouted = handle(proxy, "10.96.0.11:9080", "/other")
    assert (unrouted.status, unrouted.flags) == (404, "NR")
    assert 'response_flags="NR"' in registry.render()


def test_backend_without_endpoints_is_no_healthy_upstream() -> None:
    l7 = {"routes": [{"name": "r", "parents": [service_key("reviews")],
                      "rules": [{"backends": [{"service": "default/missing"}]}]}]}  # fmt: skip
    proxy, _ = make_proxy(l7, FakeUpstreams({}))
    response = handle(proxy, "10.96.0.10:9080")
    assert (response.status, response.flags) == (503, "UH")


def test_each_request_writes_an_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    proxy, _ = make_proxy({}, FakeUpstreams({}))
    with caplog.at_level(logging.INFO, logger="testbed.mesh.waypoint.access"):
        handle(proxy, "10.96.0.11:9080", "/a?b=1")
    (line,) = [r.getMessage() for r in caplog.records if r.name.endswith("access")]
    assert '"GET /a?b=1 HTTP/1.1" 200 - 0 2 ' in line
    assert f'"{ENDPOINTS["r1"]}:9080"' in line and CLIENT.uri in line


@pytest.mark.parametrize(
    ("first", "protocol"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2"),
        (b"PRI * garbage", "h2"),
        (b"GET / HTTP/1.1\r\n", "http/1.1"),
        (b"M-SEARCH * HTTP/1.1", "http/1.1"),
        (b"GE", "more"),
        (b"\x16\x03\x01\x02\x00", "tcp"),
        (b"hello", "tcp"),
    ],
)
def test_sniff(first: bytes, protocol: str) -> None:
    assert sniff(first) == protocol
