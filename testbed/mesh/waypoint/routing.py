"""HTTP routing for the waypoint, modelled on Gateway API HTTPRoute; pure and socket-free.

A route attaches to services (its `parents`, by "<namespace>/<hostname>") and holds rules:
each rule has matches (any of them selects the rule), weighted backends, a timeout, a retry
policy and fault injection. A match sets a path (Exact or PathPrefix), a method and exact
header values; all it sets must hold. A rule without matches matches every request, as
Gateway API's default `PathPrefix /`.

Precedence across all rules of the routes attached to a service is Gateway API's: an Exact
path beats a prefix, a longer prefix beats a shorter one, then a match with a method, then
the one with more header matches, then declaration order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

RetryOn = Literal["5xx", "connect-failure"]
Random = Callable[[], float]  # uniform in [0, 1), like random.random


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class PathMatch(_Model):
    type: Literal["Exact", "PathPrefix"] = "PathPrefix"
    value: str = "/"

    @model_validator(mode="after")
    def _absolute(self) -> PathMatch:
        if not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must start with '/'")
        return self

    def matches(self, path: str) -> bool:
        if self.type == "Exact":
            return path == self.value
        # Gateway API prefixes match whole path elements: /foo matches /foo/bar, not /foobar.
        prefix = self.value.rstrip("/")
        return path == prefix or path.startswith(prefix + "/") or not prefix


class HeaderMatch(_Model):
    name: str
    value: str


class RouteMatch(_Model):
    path: PathMatch = PathMatch()
    method: str | None = None
    headers: list[HeaderMatch] = []

    def matches(self, request: RequestFacts) -> bool:
        if self.method is not None and request.method != self.method.upper():
            return False
        if not self.path.matches(request.path):
            return False
        return all(request.header(h.name) == h.value for h in self.headers)

    def precedence(self) -> tuple[int, int, int, int]:
        """Sort key, smaller first (Gateway API's order)."""
        exact = 0 if self.path.type == "Exact" else 1
        return exact, -len(self.path.value), 0 if self.method else 1, -len(self.headers)


class Backend(_Model):
    """A service ("<namespace>/<hostname>") and port; port None keeps the request's port."""

    service: str
    port: int | None = Field(default=None, ge=1, le=65535)
    weight: int = Field(default=1, ge=0)


class RetryPolicy(_Model):
    """`attempts` retries after the first try, on the listed conditions (Istio's HTTPRetry)."""

    attempts: int = Field(default=0, ge=0, le=10)
    retry_on: list[RetryOn] = ["5xx", "connect-failure"]
    per_try_timeout: float | None = Field(default=None, gt=0)

    def should_retry(self, attempt: int, status: int | None) -> bool:
        """After try number `attempt` (1-based) ended with `status` (None: connect failure)."""
        if attempt > self.attempts:
            return False
        if status is None:
            return "connect-failure" in self.retry_on
        return status >= 500 and "5xx" in self.retry_on


class FaultDelay(_Model):
    fixed_delay: float = Field(ge=0)  # seconds
    percentage: float = Field(default=100.0, ge=0, le=100)


class FaultAbort(_Model):
    http_status: int = Field(ge=200, le=599)
    percentage: float = Field(default=100.0, ge=0, le=100)


class FaultInjection(_Model):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class RouteRule(_Model):
    matches: list[RouteMatch] = []
    backends: list[Backend] = []  # none: the parent service itself
    timeout: float | None = Field(default=None, gt=0)  # seconds, for the whole request
    retry: RetryPolicy = RetryPolicy()
    fault: FaultInjection | None = None


class HttpRoute(_Model):
    name: str
    namespace: str = "default"
    parents: list[str]  # services, "<namespace>/<hostname>"
    rules: list[RouteRule] = []


@dataclass(frozen=True)
class RequestFacts:
    """What routing and authorization look at: method, path (no query), lowercase headers."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    @classmethod
    def of(cls, method: str, target: str, headers: Iterable[tuple[str, str]]) -> RequestFacts:
        path = target.split("?", 1)[0].split("#", 1)[0] or "/"
        return cls(method.upper(), path, tuple((k.lower(), v) for k, v in headers))


@dataclass(frozen=True)
class RouteTable:
    """The rules attached to one service, in precedence order, with the match that won."""

    entries: tuple[tuple[RouteMatch, RouteRule], ...]

    @classmethod
    def build(cls, routes: Sequence[HttpRoute], service_key: str) -> RouteTable:
        entries: list[tuple[tuple[int, int, int, int], int, RouteMatch, RouteRule]] = []
        order = 0
        for route in routes:
            if service_key not in route.parents:
                continue
            for rule in route.rules:
                for match in rule.matches or [RouteMatch()]:
                    entries.append((match.precedence(), order, match, rule))
                    order += 1
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        return cls(tuple((match, rule) for _, _, match, rule in entries))

    def select(self, request: RequestFacts) -> RouteRule | None:
        """The rule for `request`; None when routes exist but none matches (Envoy: 404)."""
        for match, rule in self.entries:
            if match.matches(request):
                return rule
        return None

    @property
    def empty(self) -> bool:
        return not self.entries


DEFAULT_RULE = RouteRule()  # no route attached: straight to the service, no retries


def pick_weighted(backends: Sequence[Backend], rand: Random) -> Backend | None:
    """A backend chosen with probability weight / total weight; None if all weights are 0."""
    total = sum(b.weight for b in backends)
    if total <= 0:
        return None
    point = rand() * total
    for backend in backends:
        point -= backend.weight
        if point < 0 and backend.weight > 0:
            return backend
    return next(b for b in reversed(backends) if b.weight > 0)  # rand() rounding at the top


def fault_fires(percentage: float, rand: Random) -> bool:
    return rand() * 100.0 < percentage


@dataclass(frozen=True)
class FaultPlan:
    """What fault injection does to one request: wait `delay` s, then maybe abort."""

    delay: float = 0.0
    abort_status: int | None = None


def plan_fault(fault: FaultInjection | None, rand: Random) -> FaultPlan:
    if fault is None:
        return FaultPlan()
    delay = 0.0
    if fault.delay is not None and fault_fires(fault.delay.percentage, rand):
        delay = fault.delay.fixed_delay
    abort = None
    if fault.abort is not None and fault_fires(fault.abort.percentage, rand):
        abort = fault.abort.http_status
    return FaultPlan(delay, abort)
