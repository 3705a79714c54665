"""The waypoint's per-request L7 pipeline, as Envoy's filter chain orders it:
authorization (403 "RBAC: access denied") -> route selection (404 when routes exist and none
matches) -> fault injection (delay, then abort) -> weighted backend pick, endpoint pick,
retries and timeout -> metrics and an access log line.

Sockets stay outside: the upstream exchange is an injected `Upstreams`, so the whole
pipeline runs in unit tests against fakes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.metrics import TrafficLabels
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.l7authz import DENIED_BODY, L7Policies, Subject
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.routing import (
    DEFAULT_RULE,
    Random,
    RequestFacts,
    RouteRule,
    RouteTable,
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
    async def exchange(
        self, endpoint: Endpoint, request: HttpRequest, client: Address
    ) -> HttpResponse:
        """Send `request` to the endpoint; UpstreamConnectError if it cannot be reached,
        another ConnectionError if the connection broke before a response."""
        ...


@dataclass(frozen=True)
class Target:
    """Where the source ztunnel's CONNECT was going: a service VIP:port or a workload."""

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


@dataclass
class _Outcome:
    response: HttpResponse
    endpoint: Endpoint | None


class L7Proxy:
    def __init__(
        self,
        mesh: LocalConfig,
        l7: WaypointConfig,
        upstreams: Upstreams,
        metrics: RequestMetrics,
        *,
        rand: Random = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.rand = rand
        self.sleep = sleep
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
        rule = table.select(facts) if not table.empty else DEFAULT_RULE
        if rule is None:
            return _Outcome(HttpResponse.local(404, "no route matched", "NR"), None)
        fault = plan_fault(rule.fault, self.rand)
        if fault.delay:
            await self.sleep(fault.delay)
        if fault.abort_status is not None:
            return _Outcome(
                HttpResponse.local(fault.abort_status, "fault filter abort", "FI"), None
            )
        try:
            async with asyncio.timeout(rule.timeout):
                return await self._forward(downstream, request, rule)
        except TimeoutError:
            return _Outcome(HttpResponse.local(504, "upstream request timeout", "UT"), None)

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
            response = await self._try(endpoint, request, downstream.client, rule)
            status = None if response.flags == "UF" else response.status
            if not rule.retry.should_retry(attempt, status):
                return _Outcome(response, endpoint)
            log.debug("retrying %s %s after %s", request.method, request.target, response.status)

    async def _try(
        self, endpoint: Endpoint, request: HttpRequest, client: Address, rule: RouteRule
    ) -> HttpResponse:
        try:
            async with asyncio.timeout(rule.retry.per_try_timeout):
                response = await self.upstreams.exchange(endpoint, request, client)
        except UpstreamConnectError as exc:
            log.info("upstream %s unreachable: %s", _endpoint_text(endpoint), exc)
            response = HttpResponse.local(
                503, "upstream connect error or disconnect/reset before headers", "UF"
            )
        except ConnectionError as exc:
            log.info("upstream %s reset: %s", _endpoint_text(endpoint), exc)
            response = HttpResponse.local(
                503, "upstream connect error or disconnect/reset before headers", "UC"
            )
        except TimeoutError:  # this try's own deadline (the route's surfaces as cancellation)
            response = HttpResponse.local(504, "upstream request timeout", "UT")
        response.upstream = _endpoint_text(endpoint)
        return response

    def _pick_endpoint(
        self, target: Target, rule: RouteRule, tried: set[tuple[str, int]]
    ) -> Endpoint | None:
        candidates = self.endpoints(target, rule)
        # Like Istio's retry host predicate: prefer endpoints not tried yet.
        fresh = [e for e in candidates if _endpoint_key(e) not in tried]
        pool = fresh or candidates
        return pool[int(self.rand() * len(pool)) % len(pool)] if pool else None

    def endpoints(self, target: Target, rule: RouteRule) -> list[Endpoint]:
        """The endpoints a request under `rule` may go to (one weighted backend's)."""
        port = target.address[1]
        if not rule.backends:
            if target.service is not None:
                return self.mesh.endpoints(target.service, port)
            return [] if target.workload is None else [(target.workload, port)]
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
            response.upstream,
            request.authority,
            downstream.identity,
            downstream.target.key or "-",
        )
        access_log.info("%s", entry.line())


def _endpoint_key(endpoint: Endpoint) -> tuple[str, int]:
    return str(endpoint[0].workload_ips[0]), endpoint[1]


def _endpoint_text(endpoint: Endpoint) -> str:
    ip, port = _endpoint_key(endpoint)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
