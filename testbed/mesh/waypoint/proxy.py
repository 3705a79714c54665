"""The per-request L7 pipeline of waypoints and L7 sidecars, as Envoy's filter chain
orders it: authorization (403 "RBAC: access denied") -> route selection (404 when routes
exist and none matches) -> fault injection (delay, then abort) -> a redirect answers, or
the request filters, Envoy's request headers and mirrors -> weighted backend pick, endpoint
pick (LEAST_REQUEST: the less busy of two random endpoints), retries (Istio's default
policy unless the route sets one) and timeout -> response filters,
`x-envoy-upstream-service-time` -> metrics and an access log line in Envoy's format.

Envoy's request headers: `x-request-id` (a UUID when the client sent none),
`x-forwarded-proto` (the client's scheme when it sent none) and the client's address
appended to `x-forwarded-for`. Trace context (`traceparent`, `tracestate`, `baggage`) goes
upstream unchanged.

Sockets stay outside: the upstream exchange is an injected `Upstreams`, so the whole
pipeline runs in unit tests against fakes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from testbed.mesh.appprotocol import Handling, handling
from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.metrics import TrafficLabels
from testbed.mesh.waypoint import filters
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.http2 import StreamRefused
from testbed.mesh.waypoint.l7authz import DENIED_BODY, L7Policies, Subject
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.routing import (
    DEFAULT_RULE,
    Backend,
    Failure,
    Random,
    RequestFacts,
    RouteMatch,
    RouteRule,
    RouteTable,
    fault_fires,
    pick_weighted,
    plan_fault,
)
from testbed.mesh.waypoint.telemetry import AccessLogEntry, RequestMetrics, request_labels
from testbed.netlab.errors import TestbedError

log = logging.getLogger(__name__)
access_log = logging.getLogger("testbed.mesh.waypoint.access")

Address = tuple[str, int]
Endpoint = tuple[Workload, int]  # a workload and the port its app listens on


class UpstreamConnectError(TestbedError, ConnectionError):
    """The endpoint could not be reached (Envoy: connect failure, flag UF)."""


class Upstreams(Protocol):
    async def exchange(self, endpoint: Endpoint, request: HttpRequest) -> HttpResponse:
        """Send `request` to the endpoint; UpstreamConnectError if it cannot be reached,
        another ConnectionError if the connection broke before a response."""
        ...


@dataclass(frozen=True)
class Target:
    """Where a request is going: a service VIP:port, a workload, or (a sidecar's inbound)
    the workload itself with the service it serves on that port."""

    address: Address
    service: Service | None
    workload: Workload | None = None

    @property
    def key(self) -> str | None:
        return None if self.service is None else self.service.key


@dataclass(frozen=True)
class Downstream:
    """One tunneled connection: the client's SPIFFE identity, its address, the target."""

    identity: str | None
    client: Address
    target: Target


def resolve_target(config: LocalConfig, address: Address) -> Target | None:
    service = config.service_by_vip(*address)
    if service is not None:
        return Target(address, service)
    workload = config.workload_by_ip(address[0])
    return None if workload is None else Target(address, None, workload)


def declared_protocol(l7: WaypointConfig, mesh: LocalConfig, target: Target) -> str | None:
    """The appProtocol declared for the port `target` addresses (None: undeclared). A
    workload's port (a sidecar's inbound, a workload-addressed waypoint) takes the protocol
    of the service port whose endpoint it is; a service VIP's port, its own."""
    if target.workload is None:
        if target.service is None:
            return None
        return l7.app_protocols.get(target.service.key, {}).get(target.address[1])
    key, port = target.workload.key, target.address[1]
    for service_key, ports in l7.app_protocols.items():
        service = mesh.service_by_host(service_key)
        if service is None:
            continue
        for service_port, protocol in ports.items():
            if any(w.key == key and t == port for w, t in mesh.endpoints(service, service_port)):
                return protocol
    return None


@dataclass
class _Outcome:
    response: HttpResponse
    endpoint: Endpoint | None
    sent: HttpRequest | None = None  # the request as it went upstream (for the access log)


# Envoy's response flags of tries that got no response, as retry conditions.
_FAILURES: dict[str, Failure] = {"UF": "connect-failure", "UC": "reset", "UR": "refused-stream"}


class L7Proxy:
    def __init__(
        self,
        mesh: LocalConfig,
        l7: WaypointConfig,
        upstreams: Upstreams,
        metrics: RequestMetrics,
        *,
        reporter: str = "waypoint",
        default_rule: RouteRule = DEFAULT_RULE,
        forwarding_headers: bool = True,
        rand: Random = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`reporter` labels the metrics ("waypoint"; a sidecar's "source" or "destination");
        `default_rule` serves services without routes; `forwarding_headers` adds Envoy's
        x-request-id, x-forwarded-* (a server sidecar keeps what the client's sent)."""
        self.upstreams = upstreams
        self.metrics = metrics
        self.reporter = reporter
        self.default_rule = default_rule
        self.forwarding_headers = forwarding_headers
        self.rand = rand
        self.sleep = sleep
        self.active: dict[tuple[str, int], int] = {}  # requests in flight per endpoint
        self._mirrors: set[asyncio.Task[None]] = set()
        self.update(mesh, l7)

    def update(self, mesh: LocalConfig, l7: WaypointConfig) -> None:
        self.mesh, self.l7 = mesh, l7
        self._tables: dict[str | None, RouteTable] = {}
        self._policies: dict[str | None, L7Policies] = {}
        self._labels: dict[tuple[str, str | None, str | None, str | None], TrafficLabels] = {}

    def policies(self, service_key: str | None) -> L7Policies:
        found = self._policies.get(service_key)
        if found is None:
            found = self._policies[service_key] = L7Policies(self.l7.policies, service_key)
        return found

    def table(self, service_key: str | None) -> RouteTable:
        found = self._tables.get(service_key)
        if found is None:
            routes = self.l7.routes if service_key else []
            found = self._tables[service_key] = RouteTable.build(routes, service_key or "")
        return found

    def protocol_handling(self, target: Target) -> Handling:
        """HTTP, TCP or sniffed, as the target port's declared appProtocol says."""
        return handling(declared_protocol(self.l7, self.mesh, target))

    def allows_tcp(self, downstream: Downstream) -> bool:
        """L4 check for a connection passed through as TCP."""
        subject = Subject.from_identity(downstream.identity, downstream.target.address[1])
        return self.policies(downstream.target.key).evaluate(subject).allowed

    # -- the pipeline ---------------------------------------------------------------------
    async def handle(
        self,
        downstream: Downstream,
        request: HttpRequest,
        on_endpoint: Callable[[Endpoint], None] | None = None,
    ) -> HttpResponse:
        """Serve one request; `on_endpoint` learns which endpoint answered it, if any."""
        started, wall = time.perf_counter(), datetime.datetime.now(datetime.UTC)
        outcome = await self._process(downstream, request)
        duration_ms = (time.perf_counter() - started) * 1000.0
        self._record(downstream, request, outcome, wall, duration_ms)
        if on_endpoint is not None and outcome.endpoint is not None:
            on_endpoint(outcome.endpoint)
        return outcome.response

    async def _process(self, downstream: Downstream, request: HttpRequest) -> _Outcome:
        target = downstream.target
        facts = RequestFacts.of(request.method, request.target, request.headers)
        subject = Subject.from_identity(downstream.identity, target.address[1], facts)
        decision = self.policies(target.key).evaluate(subject)
        if not decision.allowed:
            log.info(
                "%s %s denied: %s (%s)",
                request.method,
                facts.path,
                decision.reason,
                decision.policy,
            )
            denied = HttpResponse(403, [("content-type", "text/plain")], DENIED_BODY, "RBAC")
            return _Outcome(denied, None)
        table = self.table(target.key)
        selected = table.select(facts) if not table.empty else (RouteMatch(), self.default_rule)
        if selected is None:
            return _Outcome(HttpResponse.local(404, "no route matched", "NR"), None)
        match, rule = selected
        fault = plan_fault(rule.fault, self.rand)
        if fault.delay:
            await self.sleep(fault.delay)
        if fault.abort_status is not None:
            return _Outcome(
                HttpResponse.local(fault.abort_status, "fault filter abort", "FI"), None
            )
        for redirect in rule.filter_of("RequestRedirect"):
            assert redirect.request_redirect is not None
            response = filters.redirect_response(request, redirect.request_redirect, match)
            return _Outcome(response, None)
        upstream_request = filters.rewrite_request(request, rule, match)
        if self.forwarding_headers:
            upstream_request = envoy_request_headers(upstream_request, downstream.client)
        self._mirror(downstream.target, upstream_request, rule)
        try:
            async with asyncio.timeout(rule.timeout):
                outcome = await self._forward(downstream, upstream_request, rule)
        except TimeoutError:
            return _Outcome(HttpResponse.local(504, "upstream request timeout", "UT"), None)
        filters.rewrite_response(outcome.response, rule)
        outcome.sent = upstream_request
        return outcome

    def _mirror(self, target: Target, request: HttpRequest, rule: RouteRule) -> None:
        """Copies to the rule's mirrors, in tasks of their own; their answers are dropped."""
        for backend, percent in filters.mirror_targets(rule):
            if not fault_fires(percent, self.rand):
                continue
            shadow = RouteRule(backends=[Backend(service=backend.service, port=backend.port)])
            endpoints = self.endpoints(target, shadow)
            if not endpoints:
                log.info("mirror %s has no endpoint", backend.service)
                continue
            endpoint = self._least_request(endpoints)
            task = asyncio.ensure_future(self._send_mirror(endpoint, filters.mirrored(request)))
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)

    async def _send_mirror(self, endpoint: Endpoint, request: HttpRequest) -> None:
        try:
            await self.upstreams.exchange(endpoint, request)
        except (ConnectionError, TimeoutError) as exc:
            log.info("mirror %s failed: %s", _endpoint_text(endpoint), exc)

    async def _forward(
        self, downstream: Downstream, request: HttpRequest, rule: RouteRule
    ) -> _Outcome:
        tried: set[tuple[str, int]] = set()
        attempt = 0
        while True:
            attempt += 1
            endpoint = self._pick_endpoint(downstream.target, rule, tried)
            if endpoint is None:
                return _Outcome(HttpResponse.local(503, "no healthy upstream", "UH"), None)
            tried.add(_endpoint_key(endpoint))
            response = await self._try(endpoint, request, rule)
            failure = _FAILURES.get(response.flags)
            status = None if failure else response.status
            grpc = _header(response.headers, "grpc-status") or ""
            if not rule.retry.should_retry(attempt, status, failure, grpc):
                return _Outcome(response, endpoint)
            log.debug("retrying %s %s after %s", request.method, request.target, response.status)

    async def _try(self, endpoint: Endpoint, request: HttpRequest, rule: RouteRule) -> HttpResponse:
        key = _endpoint_key(endpoint)
        self.active[key] = self.active.get(key, 0) + 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(rule.retry.per_try_timeout):
                response = await self.upstreams.exchange(endpoint, request)
            elapsed_ms = round((time.perf_counter() - started) * 1000.0)
            response.headers.append(("x-envoy-upstream-service-time", str(elapsed_ms)))
        except UpstreamConnectError as exc:
            log.info("upstream %s unreachable: %s", _endpoint_text(endpoint), exc)
            response = HttpResponse.local(
                503, "upstream connect error or disconnect/reset before headers", "UF"
            )
        except StreamRefused as exc:
            log.info("upstream %s refused the stream: %s", _endpoint_text(endpoint), exc)
            response = HttpResponse.local(
                503, "upstream connect error or disconnect/reset before headers", "UR"
            )
        except ConnectionError as exc:
            log.info("upstream %s reset: %s", _endpoint_text(endpoint), exc)
            response = HttpResponse.local(
                503, "upstream connect error or disconnect/reset before headers", "UC"
            )
        except TimeoutError:  # this try's own deadline (the route's surfaces as cancellation)
            response = HttpResponse.local(504, "upstream request timeout", "UT")
        finally:
            self.active[key] -= 1
        response.upstream = _endpoint_text(endpoint)
        return response

    def _pick_endpoint(
        self, target: Target, rule: RouteRule, tried: set[tuple[str, int]]
    ) -> Endpoint | None:
        candidates = self.endpoints(target, rule)
        # Like Istio's retry host predicate: prefer endpoints not tried yet.
        fresh = [e for e in candidates if _endpoint_key(e) not in tried]
        pool = fresh or candidates
        return self._least_request(pool) if pool else None

    def _least_request(self, pool: list[Endpoint]) -> Endpoint:
        """Envoy's LEAST_REQUEST with equal weights: of two random picks, the one with fewer
        requests in flight (the first on a tie)."""
        first, second = (pool[int(self.rand() * len(pool)) % len(pool)] for _ in range(2))
        busy = self.active.get
        return second if busy(_endpoint_key(second), 0) < busy(_endpoint_key(first), 0) else first

    def endpoints(self, target: Target, rule: RouteRule) -> list[Endpoint]:
        """The endpoints a request under `rule` may go to (one weighted backend's)."""
        port = target.address[1]
        if not rule.backends:  # a target naming a workload is that workload, else the service's
            if target.workload is not None:
                return [(target.workload, port)]
            return [] if target.service is None else self.mesh.endpoints(target.service, port)
        backend = pick_weighted(rule.backends, self.rand)
        if backend is None:
            return []
        service = self.mesh.service_by_host(backend.service)
        return [] if service is None else self.mesh.endpoints(service, backend.port or port)

    # -- telemetry ------------------------------------------------------------------------
    def _traffic_labels(
        self, downstream: Downstream, destination: Workload | None
    ) -> TrafficLabels:
        """Labels per (client, service, endpoint), built once: requests repeat them."""
        key = (downstream.client[0], downstream.identity, downstream.target.key,
               None if destination is None else destination.key)  # fmt: skip
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = request_labels(
                reporter=self.reporter,
                source=self.mesh.workload_by_ip(downstream.client[0]),
                source_principal=downstream.identity,
                service=downstream.target.service,
                destination=destination,
            )
        return labels

    def _record(
        self,
        downstream: Downstream,
        request: HttpRequest,
        outcome: _Outcome,
        wall: datetime.datetime,
        duration_ms: float,
    ) -> None:
        response = outcome.response
        destination = outcome.endpoint[0] if outcome.endpoint else downstream.target.workload
        self.metrics.record(
            self._traffic_labels(downstream, destination),
            response.status,
            response.flags,
            duration_ms,
        )
        if not access_log.isEnabledFor(logging.INFO):
            return
        sent = outcome.sent or request
        entry = AccessLogEntry(
            wall,
            request.method,
            request.target,
            request.protocol,
            response.status,
            response.flags,
            len(request.body),
            len(response.body),
            duration_ms,
            _header(response.headers, "x-envoy-upstream-service-time"),
            _header(sent.headers, "x-forwarded-for"),
            _header(sent.headers, "user-agent"),
            _header(sent.headers, "x-request-id"),
            request.authority,
            response.upstream,
        )
        access_log.info("%s", entry.line())


def envoy_request_headers(request: HttpRequest, client: Address) -> HttpRequest:
    """The request with `x-request-id`, `x-forwarded-proto` and `x-forwarded-for` as Envoy
    sets them (an id and a scheme the client sent are kept; its address is appended)."""
    headers = list(request.headers)
    if _header(headers, "x-request-id") is None:
        headers.append(("x-request-id", str(uuid.uuid4())))
    if _header(headers, "x-forwarded-proto") is None:
        headers.append(("x-forwarded-proto", "http"))
    forwarded_for = _header(headers, "x-forwarded-for")
    chain = client[0] if forwarded_for is None else f"{forwarded_for}, {client[0]}"
    headers = [(n, v) for n, v in headers if n != "x-forwarded-for"] + [("x-forwarded-for", chain)]
    return replace(request, headers=headers)


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key == name), None)


def _endpoint_key(endpoint: Endpoint) -> tuple[str, int]:
    return str(endpoint[0].workload_ips[0]), endpoint[1]


def _endpoint_text(endpoint: Endpoint) -> str:
    ip, port = _endpoint_key(endpoint)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
