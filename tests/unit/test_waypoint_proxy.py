"""The waypoint's request pipeline against fake upstreams: failure handling, metrics, log."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from hbone_support import run
from waypoint_support import (
    CLIENT,
    CLIENT_ADDRESS,
    ENDPOINTS,
    REVIEWS_VIP,
    local_config,
    service_key,
)

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
    # Envoy's default format: ... flags, bytes in/out, duration, upstream service time, then
    # "x-forwarded-for" "user-agent" "x-request-id" "authority" "upstream host".
    pattern = (
        r'^\[\S+\] "GET /a\?b=1 HTTP/1\.1" 200 - 0 2 \d+ \d+ '
        rf'"{CLIENT_ADDRESS[0]}" "-" "[0-9a-f-]{{36}}" "flaky" "{ENDPOINTS["r1"]}:9080"$'
    )
    assert re.match(pattern, line), line


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


class RecordingUpstreams(FakeUpstreams):
    def __init__(self, behaviour: dict[str, Any]) -> None:
        super().__init__(behaviour)
        self.requests: list[tuple[str, HttpRequest]] = []

    async def exchange(self, endpoint: Endpoint, request: HttpRequest) -> HttpResponse:
        self.requests.append((str(endpoint[0].workload_ips[0]), request))
        return await super().exchange(endpoint, request)


def reviews_route(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"routes": [{"name": "r", "parents": [service_key("reviews")], "rules": list(rules)}]}


def test_a_redirect_answers_without_going_upstream() -> None:
    upstreams = RecordingUpstreams({})
    target = {"hostname": "new", "statusCode": 301}
    redirect = {"type": "RequestRedirect", "requestRedirect": target}
    proxy, _ = make_proxy(reviews_route({"filters": [redirect]}), upstreams)
    response = handle(proxy, "10.96.0.10:9080", "/x?y=1")
    assert (response.status, dict(response.headers)["location"]) == (301, "http://new/x?y=1")
    assert upstreams.requests == []


def test_rewrite_and_header_filters_change_what_goes_upstream() -> None:
    upstreams = RecordingUpstreams({})
    rewrite = {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
               "replacePrefixMatch": "/api"}}}  # fmt: skip
    add = {"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-a",
           "value": "1"}]}}  # fmt: skip
    rule = {"matches": [{"path": {"value": "/old"}}], "filters": [rewrite, add],
            "backends": [{"service": service_key("reviews-v1")}]}  # fmt: skip
    proxy, _ = make_proxy(reviews_route(rule), upstreams)
    assert handle(proxy, "10.96.0.10:9080", "/old/item").status == 200
    [(ip, sent)] = upstreams.requests
    assert (ip, sent.target, ("x-a", "1") in sent.headers) == (ENDPOINTS["r1"], "/api/item", True)


def test_a_mirror_gets_a_copy_and_its_answer_is_dropped() -> None:
    upstreams = RecordingUpstreams({ENDPOINTS["r2"]: 500})
    mirror = {"type": "RequestMirror",
              "requestMirror": {"backendRef": {"service": service_key("reviews-v2")}}}  # fmt: skip
    rule = {"filters": [mirror], "backends": [{"service": service_key("reviews-v1")}]}
    proxy, _ = make_proxy(reviews_route(rule), upstreams)

    async def both() -> HttpResponse:
        destination = resolve_target(proxy.mesh, ("10.96.0.10", 9080))
        assert destination is not None
        request = HttpRequest("GET", "/m", "reviews:9080", [])
        response = await proxy.handle(Downstream(CLIENT.uri, CLIENT_ADDRESS, destination), request)
        await asyncio.sleep(0.01)  # the mirror runs in a task of its own
        return response

    assert run(both()).status == 200  # the primary's answer, not the mirror's 500
    by_ip = dict(upstreams.requests)
    assert by_ip[ENDPOINTS["r2"]].authority == "reviews-shadow:9080"
    assert by_ip[ENDPOINTS["r1"]].authority == "reviews:9080"


def test_least_request_takes_the_less_busy_of_two_picks() -> None:
    upstreams = FakeUpstreams({})
    proxy, _ = make_proxy({}, upstreams)
    picks = iter([0.0, 0.9] * 10)  # first pick r1, second r2 (reviews has r1, r2)
    proxy.rand = lambda: next(picks)
    proxy.active[(ENDPOINTS["r1"], 9080)] = 3  # r1 busy
    handle(proxy, REVIEWS_VIP)
    proxy.active[(ENDPOINTS["r1"], 9080)] = 0
    proxy.active[(ENDPOINTS["r2"], 9080)] = 3  # now r2 busy
    handle(proxy, REVIEWS_VIP)
    assert upstreams.calls == [ENDPOINTS["r2"], ENDPOINTS["r1"]]
