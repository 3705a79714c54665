"""L7 authorization in the waypoint, modelled on Istio's AuthorizationPolicy; pure.

A policy has an action (ALLOW or DENY), the services it targets ("<namespace>/<hostname>";
none: everything the waypoint serves) and rules. A rule matches when any of its `from`
sources, any of its `to` operations and all of its `when` conditions match (an absent list
matches). A source or operation matches when every field it sets matches: one of its values
and none of its `not` values. Strings use Istio's forms: exact, "prefix*", "*suffix", "*".
Principals are written as Istio writes them: `cluster.local/ns/<ns>/sa/<sa>`.

Decision order (Istio's): a matching DENY denies; with no ALLOW policies the request is
allowed; a matching ALLOW allows; otherwise it is denied. A denial is answered with
403 "RBAC: access denied".

Plain TCP through the waypoint is checked with the same policies, as Istio does: an ALLOW
rule that needs HTTP fields (methods, paths, request headers) cannot match it, while a DENY
rule ignores those fields and so denies more.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from testbed.mesh.config import StringMatch
from testbed.mesh.waypoint.routing import RequestFacts

DENIED_BODY = b"RBAC: access denied"
_HEADER_KEY = re.compile(r"^request\.headers\[([^\]]+)\]$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def _any(patterns: Sequence[StringMatch], value: str | None) -> bool:
    return value is not None and any(p.matches(value) for p in patterns)


def _field_ok(
    values: Sequence[StringMatch], not_values: Sequence[StringMatch], v: str | None
) -> bool:
    return (not values or _any(values, v)) and not (not_values and _any(not_values, v))


class Source(_Model):
    principals: list[StringMatch] = []
    not_principals: list[StringMatch] = []
    namespaces: list[StringMatch] = []
    not_namespaces: list[StringMatch] = []

    def matches(self, subject: Subject) -> bool:
        return _field_ok(self.principals, self.not_principals, subject.principal) and _field_ok(
            self.namespaces, self.not_namespaces, subject.namespace
        )


class Operation(_Model):
    methods: list[StringMatch] = []
    not_methods: list[StringMatch] = []
    paths: list[StringMatch] = []
    not_paths: list[StringMatch] = []
    ports: list[int] = []
    not_ports: list[int] = []

    @property
    def needs_http(self) -> bool:
        return bool(self.methods or self.not_methods or self.paths or self.not_paths)

    def matches(self, subject: Subject, ignore_http: bool) -> bool:
        if self.ports and subject.port not in self.ports:
            return False
        if self.not_ports and subject.port in self.not_ports:
            return False
        request = subject.request
        if request is None:
            return ignore_http or not self.needs_http
        return _field_ok(self.methods, self.not_methods, request.method) and _field_ok(
            self.paths, self.not_paths, request.path
        )


class Condition(_Model):
    """`when`: only `request.headers[<name>]` keys (the HTTP ones Istio offers)."""

    key: str
    values: list[StringMatch] = []
    not_values: list[StringMatch] = []

    @field_validator("key")
    @classmethod
    def _known_key(cls, key: str) -> str:
        if not _HEADER_KEY.match(key):
            raise ValueError(f"condition key {key!r}: expected request.headers[<name>]")
        return key

    @property
    def header(self) -> str:
        match = _HEADER_KEY.match(self.key)
        assert match is not None
        return match.group(1).lower()

    def matches(self, subject: Subject, ignore_http: bool) -> bool:
        if subject.request is None:
            return ignore_http
        return _field_ok(self.values, self.not_values, subject.request.header(self.header))


class Rule(_Model):
    sources: list[Source] = Field(default=[], alias="from")
    to: list[Operation] = []
    when: list[Condition] = []

    def matches(self, subject: Subject, ignore_http: bool) -> bool:
        return (
            (not self.sources or any(s.matches(subject) for s in self.sources))
            and (not self.to or any(o.matches(subject, ignore_http) for o in self.to))
            and all(c.matches(subject, ignore_http) for c in self.when)
        )


class L7Policy(_Model):
    name: str
    namespace: str = "default"
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    targets: list[str] = []  # "<namespace>/<hostname>" of services; empty: all
    rules: list[Rule] = []

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies_to(self, service_key: str | None) -> bool:
        return not self.targets or service_key in self.targets

    def matches(self, subject: Subject) -> bool:
        # A DENY checks plain TCP without its HTTP fields (stricter); an ALLOW cannot match.
        ignore_http = self.action == "DENY"
        return any(rule.matches(subject, ignore_http) for rule in self.rules)


@dataclass(frozen=True)
class Subject:
    """Who asks for what: the client's principal (no `spiffe://`), its namespace, the
    destination port, and the HTTP request (None for plain TCP)."""

    principal: str | None
    namespace: str | None
    port: int
    request: RequestFacts | None = None

    @classmethod
    def from_identity(
        cls, spiffe_uri: str | None, port: int, request: RequestFacts | None = None
    ) -> Subject:
        if spiffe_uri is None or not spiffe_uri.startswith("spiffe://"):
            return cls(None, None, port, request)
        principal = spiffe_uri.removeprefix("spiffe://")
        parts = principal.split("/")
        namespace = parts[2] if len(parts) == 5 and parts[1] == "ns" else None
        return cls(principal, namespace, port, request)


@dataclass(frozen=True)
class L7Decision:
    allowed: bool
    policy: str | None
    reason: str


class L7Policies:
    """The policies that apply to one service, split by action, evaluated per request."""

    def __init__(self, policies: Sequence[L7Policy], service_key: str | None) -> None:
        applicable = [p for p in policies if p.applies_to(service_key)]
        self.deny = [p for p in applicable if p.action == "DENY"]
        self.allow = [p for p in applicable if p.action == "ALLOW"]

    def evaluate(self, subject: Subject) -> L7Decision:
        for policy in self.deny:
            if policy.matches(subject):
                return L7Decision(False, policy.key, "matched a DENY policy")
        if not self.allow:
            return L7Decision(True, None, "no ALLOW policies apply")
        for policy in self.allow:
            if policy.matches(subject):
                return L7Decision(True, policy.key, "matched an ALLOW policy")
        return L7Decision(False, None, "no ALLOW policy matched")
