"""HTTP routing for waypoints and L7 sidecars, modelled on Gateway API HTTPRoute; pure.

A route attaches to services (its `parents`, by "<namespace>/<hostname>") and holds rules:
each rule has matches (any of them selects the rule), filters, weighted backends, a timeout,
a retry policy and fault injection. A match sets a path (Exact, PathPrefix or
RegularExpression, the last matching the whole path), a method, header values and query
parameter values (Exact or RegularExpression); all it sets must hold. A rule without
matches matches every request, as Gateway API's default `PathPrefix /`.

Precedence across all rules of the routes attached to a service is the Gateway API spec's,
continuing on ties: an Exact path, then the longest PathPrefix, then a match with a method,
then the most header matches, then the most query parameter matches; then the route
declared first (the testbed's creation order), then "<namespace>/<name>" alphabetically,
then the first rule and match in list order. RegularExpression paths rank below every
prefix, longest pattern first, as Istio orders them (the spec leaves them to
implementations).

Filters (testbed.mesh.waypoint.filters applies them): RequestHeaderModifier,
ResponseHeaderModifier, URLRewrite, RequestRedirect, RequestMirror. Other Gateway API
filter types (CORS, ExtensionRef, ...) are refused by name when the route is loaded.

With no retry policy written, a rule retries as Istio's default policy does: 2 retries on
connect-failure, refused-stream, unavailable, cancelled and status 503.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

RetryOn = Literal[
    "5xx",
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
    "reset",
]
# Istio's default retry policy (the sidecar's and waypoint's when a route sets none).
DEFAULT_RETRY_ON: tuple[RetryOn, ...] = (
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
)
DEFAULT_RETRY_ATTEMPTS = 2
# gRPC status codes of `unavailable` and `cancelled`, read from the grpc-status header.
GRPC_STATUS = {"unavailable": "14", "cancelled": "1"}
Random = Callable[[], float]  # uniform in [0, 1), like random.random


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regular expression {pattern!r} does not compile: {exc}") from None


class PathMatch(_Model):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"

    @model_validator(mode="after")
    def _valid(self) -> PathMatch:
        if self.type == "RegularExpression":
            _compiled(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must start with '/'")
        return self

    def matches(self, path: str) -> bool:
        if self.type == "Exact":
            return path == self.value
        if self.type == "RegularExpression":
            return _compiled(self.value).fullmatch(path) is not None
        # Gateway API prefixes match whole path elements: /foo matches /foo/bar, not /foobar.
        prefix = self.value.rstrip("/")
        return path == prefix or path.startswith(prefix + "/") or not prefix

    def rank(self) -> int:
        """Exact first, then prefixes, then regular expressions (smaller first)."""
        return {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}[self.type]


class ValueMatch(_Model):
    """A header or query parameter: its name and an Exact or RegularExpression value."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1)
    value: str

    @model_validator(mode="after")
    def _valid(self) -> ValueMatch:
        if self.type == "RegularExpression":
            _compiled(self.value)
        return self

    def matches(self, found: str | None) -> bool:
        if found is None:
            return False
        if self.type == "Exact":
            return found == self.value
        return _compiled(self.value).fullmatch(found) is not None


HeaderMatch = ValueMatch
QueryParamMatch = ValueMatch


class RouteMatch(_Model):
    path: PathMatch = PathMatch()
    method: str | None = None
    headers: list[HeaderMatch] = []
    query_params: list[QueryParamMatch] = []

    def matches(self, request: RequestFacts) -> bool:
        if self.method is not None and request.method != self.method.upper():
            return False
        if not self.path.matches(request.path):
            return False
        if not all(h.matches(request.header(h.name)) for h in self.headers):
            return False
        return all(q.matches(request.query_param(q.name)) for q in self.query_params)

    def precedence(self) -> tuple[int, int, int, int, int]:
        """Sort key, smaller first (Gateway API's order)."""
        return (
            self.path.rank(),
            -len(self.path.value),
            0 if self.method else 1,
            -len(self.headers),
            -len(self.query_params),
        )


class Backend(_Model):
    """A service ("<namespace>/<hostname>") and port; port None keeps the request's port."""

    service: str
    port: int | None = Field(default=None, ge=1, le=65535)
    weight: int = Field(default=1, ge=0)


Failure = Literal["connect-failure", "reset", "refused-stream"]


class RetryPolicy(_Model):
    """`attempts` retries after the first try, on the listed conditions (Istio's HTTPRetry,
    Envoy's retry_on names); the defaults are Istio's default retry policy."""

    attempts: int = Field(default=DEFAULT_RETRY_ATTEMPTS, ge=0, le=10)
    retry_on: list[RetryOn] = list(DEFAULT_RETRY_ON)
    retriable_status_codes: list[int] = [503]
    per_try_timeout: float | None = Field(default=None, gt=0)

    def should_retry(
        self, attempt: int, status: int | None, failure: Failure | None = None, grpc: str = ""
    ) -> bool:
        """After try number `attempt` (1-based) ended with `status`, or without a response
        (`failure`; status None), with `grpc` the response's grpc-status."""
        if attempt > self.attempts:
            return False
        if status is None:
            return (failure or "connect-failure") in self.retry_on or (
                failure == "reset" and "5xx" in self.retry_on
            )
        if "5xx" in self.retry_on and status >= 500:
            return True
        if "retriable-status-codes" in self.retry_on and status in self.retriable_status_codes:
            return True
        return any(
            GRPC_STATUS[c] == grpc for c in ("unavailable", "cancelled") if c in self.retry_on
        )


class FaultDelay(_Model):
    fixed_delay: float = Field(ge=0)  # seconds
    percentage: float = Field(default=100.0, ge=0, le=100)


class FaultAbort(_Model):
    http_status: int = Field(ge=200, le=599)
    percentage: float = Field(default=100.0, ge=0, le=100)


class FaultInjection(_Model):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class HeaderValue(_Model):
    name: str = Field(min_length=1)
    value: str


class HeaderModifier(_Model):
    """Gateway API's HTTPHeaderFilter: set (replace), add (append), remove, in that order."""

    set: list[HeaderValue] = []
    add: list[HeaderValue] = []
    remove: list[str] = []


class PathModifier(_Model):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None

    @model_validator(mode="after")
    def _one_value(self) -> PathModifier:
        wanted = "replace_full_path" if self.type == "ReplaceFullPath" else "replace_prefix_match"
        other = "replace_prefix_match" if wanted == "replace_full_path" else "replace_full_path"
        if getattr(self, wanted) is None or getattr(self, other) is not None:
            raise ValueError(f"type {self.type} needs {to_camel(wanted)} (and only that)")
        return self

    @property
    def value(self) -> str:
        return self.replace_full_path or self.replace_prefix_match or "/"


class UrlRewrite(_Model):
    hostname: str | None = None
    path: PathModifier | None = None


class RequestRedirect(_Model):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    status_code: Literal[301, 302, 303, 307, 308] = 302


class BackendRef(_Model):
    """A service ("<namespace>/<hostname>") and port; port None keeps the request's port."""

    service: str
    port: int | None = Field(default=None, ge=1, le=65535)


class RequestMirror(_Model):
    backend_ref: BackendRef
    percent: float = Field(default=100.0, ge=0, le=100)


FILTER_FIELDS = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "URLRewrite": "url_rewrite",
    "RequestRedirect": "request_redirect",
    "RequestMirror": "request_mirror",
}


class Filter(_Model):
    """One HTTPRouteFilter: `type` and the field of that type, as Gateway API writes them."""

    type: str
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    url_rewrite: UrlRewrite | None = None
    request_redirect: RequestRedirect | None = None
    request_mirror: RequestMirror | None = None

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind is not None and kind not in FILTER_FIELDS:
            supported = ", ".join(FILTER_FIELDS)
            raise ValueError(f"filter type {kind!r} is not supported (supported: {supported})")
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> Filter:
        wanted = FILTER_FIELDS[self.type]
        present = [f for f in FILTER_FIELDS.values() if getattr(self, f) is not None]
        if present != [wanted]:
            raise ValueError(f"filter type {self.type} needs {to_camel(wanted)} and no other field")
        return self


class RouteRule(_Model):
    matches: list[RouteMatch] = []
    filters: list[Filter] = []
    backends: list[Backend] = []  # none: the parent service itself
    timeout: float | None = Field(default=None, gt=0)  # seconds, for the whole request
    retry: RetryPolicy = RetryPolicy()
    fault: FaultInjection | None = None

    @model_validator(mode="after")
    def _filters_combine(self) -> RouteRule:
        kinds = [f.type for f in self.filters]
        if "RequestRedirect" in kinds and "URLRewrite" in kinds:
            raise ValueError("filters RequestRedirect and URLRewrite cannot be used together")
        for kind in ("RequestRedirect", "URLRewrite"):
            if kinds.count(kind) > 1:
                raise ValueError(f"filter {kind} may appear once per rule")
        for f in self.filters:
            target = f.url_rewrite or f.request_redirect
            modifier = None if target is None else target.path
            prefix_only = all(m.path.type == "PathPrefix" for m in self.matches)
            if modifier is not None and modifier.type == "ReplacePrefixMatch" and not prefix_only:
                raise ValueError("ReplacePrefixMatch needs PathPrefix matches only")
        return self

    def filter_of(self, kind: str) -> list[Filter]:
        return [f for f in self.filters if f.type == kind]


class HttpRoute(_Model):
    name: str
    namespace: str = "default"
    parents: list[str]  # services, "<namespace>/<hostname>"
    rules: list[RouteRule] = []


@dataclass(frozen=True)
class RequestFacts:
    """What routing and authorization look at: method, path (no query), lowercase headers,
    the query's parameters."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def query_param(self, name: str) -> str | None:
        """The first value of a query parameter (names are case-sensitive, as in the spec)."""
        return next((value for key, value in self.query if key == name), None)

    @classmethod
    def of(cls, method: str, target: str, headers: Iterable[tuple[str, str]]) -> RequestFacts:
        path, _, query = target.split("#", 1)[0].partition("?")
        params = tuple(parse_qsl(query, keep_blank_values=True))
        return cls(method.upper(), path or "/", tuple((k.lower(), v) for k, v in headers), params)


@dataclass(frozen=True)
class RouteTable:
    """The rules attached to one service, in precedence order, with the match that won."""

    entries: tuple[tuple[RouteMatch, RouteRule], ...]

    @classmethod
    def build(cls, routes: Sequence[HttpRoute], service_key: str) -> RouteTable:
        entries: list[tuple[tuple[int, ...], RouteMatch, RouteRule]] = []
        for created, route in enumerate(routes):  # declaration order is creation order
            if service_key not in route.parents:
                continue
            for rule_index, rule in enumerate(route.rules):
                for match_index, match in enumerate(rule.matches or [RouteMatch()]):
                    # The creation order is total, so "<namespace>/<name>" never breaks a tie.
                    ties = (created, rule_index, match_index)
                    entries.append(((*match.precedence(), *ties), match, rule))
        entries.sort(key=lambda entry: entry[0])
        return cls(tuple((match, rule) for _, match, rule in entries))

    def select(self, request: RequestFacts) -> tuple[RouteMatch, RouteRule] | None:
        """The match and rule for `request`; None when routes exist but none matches
        (Envoy answers 404)."""
        for match, rule in self.entries:
            if match.matches(request):
                return match, rule
        return None

    @property
    def empty(self) -> bool:
        return not self.entries


DEFAULT_RULE = RouteRule()  # no route attached: straight to the service, default retries


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
