"""L4 authorization, with the semantics of ztunnel's src/rbac.rs and ProxyState::assert_rbac.

Decision order (Istio's): a matching DENY denies; with no ALLOW policies the connection is
allowed; a matching ALLOW allows; otherwise it is denied. Dry-run policies never decide.

A policy matches if any rule matches; a rule if all its clauses match; a clause if any of its
match groups matches (an empty clause matches, a group with no fields never does); a group if
each field it sets matches one of its values and none of its `not` values.

A connection without identity (plaintext) is matched as ztunnel does: principal and namespace
values never match it (so `notPrincipals`/`notNamespaces` always pass), source IPs still do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import ip_address
from typing import TypeVar

from testbed.mesh.ca import Identity
from testbed.mesh.config import (
    Authorization,
    IpNetwork,
    LocalConfig,
    RbacMatch,
    ServiceAccountMatch,
    StringMatch,
    Workload,
)


@dataclass(frozen=True)
class ConnectionFacts:
    source_identity: Identity | None
    source_ip: str
    destination_ip: str
    destination_port: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None  # "<namespace>/<name>" of the deciding policy, None if no policy decided
    reason: str


# Connections come from few addresses again and again; parsing one costs microseconds.
_parse_ip = lru_cache(maxsize=4096)(ip_address)


class _Subject:
    """What the predicates look at, derived once per evaluation."""

    __slots__ = ("facts", "namespace", "principal", "service_account")

    def __init__(self, facts: ConnectionFacts):
        self.facts = facts
        identity = facts.source_identity
        # As ztunnel: without identity the principal matches nothing and the namespace is "".
        self.principal = None if identity is None else identity.principal
        self.namespace = "" if identity is None else identity.namespace
        self.service_account = (
            None if identity is None else (identity.namespace, identity.service_account)
        )


Predicate = Callable[[_Subject], bool]
T = TypeVar("T")


def _strings(matches: list[StringMatch]) -> Callable[[str], bool]:
    exact = frozenset(m.value for m in matches if m.kind == "Exact")
    others = [m for m in matches if m.kind != "Exact"]
    return lambda s: s in exact or any(m.matches(s) for m in others)


def _principal_test(matches: list[StringMatch]) -> Predicate:
    test = _strings(matches)
    return lambda s: s.principal is not None and test(s.principal)


def _namespace_test(matches: list[StringMatch]) -> Predicate:
    test = _strings(matches)
    return lambda s: test(s.namespace)


def _service_account_test(matches: list[ServiceAccountMatch]) -> Predicate:
    wanted = frozenset((m.namespace, m.service_account) for m in matches)
    return lambda s: s.service_account in wanted


def _source_ip_test(networks: list[IpNetwork]) -> Predicate:
    return lambda s: any(_parse_ip(s.facts.source_ip) in n for n in networks)


def _destination_ip_test(networks: list[IpNetwork]) -> Predicate:
    return lambda s: any(_parse_ip(s.facts.destination_ip) in n for n in networks)


def _port_test(ports: list[int]) -> Predicate:
    wanted = frozenset(ports)
    return lambda s: s.facts.destination_port in wanted


def _negated(test: Predicate) -> Predicate:
    return lambda s: not test(s)


def _field(
    values: list[T], not_values: list[T], make: Callable[[list[T]], Predicate]
) -> list[Predicate]:
    predicates = [make(values)] if values else []
    return predicates + ([_negated(make(not_values))] if not_values else [])


def _compile_group(g: RbacMatch) -> tuple[Predicate, ...]:
    return (
        *_field(g.destination_ips, g.not_destination_ips, _destination_ip_test),
        *_field(g.source_ips, g.not_source_ips, _source_ip_test),
        *_field(g.destination_ports, g.not_destination_ports, _port_test),
        *_field(g.service_accounts, g.not_service_accounts, _service_account_test),
        *_field(g.principals, g.not_principals, _principal_test),
        *_field(g.namespaces, g.not_namespaces, _namespace_test),
    )


# A clause is its match groups' predicates; None stands for an empty clause, which matches.
Clause = tuple[tuple[Predicate, ...], ...] | None


def _compile_clause(clause: list[RbacMatch]) -> Clause:
    if not clause:
        return None
    # A group that sets no field never matches (ztunnel skips it).
    return tuple(g for g in map(_compile_group, clause) if g)


def _rule_matches(rule: tuple[Clause, ...], subject: _Subject) -> bool:
    # Plain loops: this runs per connection and generator expressions cost more.
    for clause in rule:
        if clause is None:
            continue
        for group in clause:
            for test in group:
                if not test(subject):
                    break
            else:
                break  # every test of this group passed: the clause matches
        else:
            return False  # no group matched
    return True


@dataclass(frozen=True)
class CompiledPolicy:
    rules: tuple[tuple[Clause, ...], ...]
    decision: Decision  # what a match of this policy decides

    @classmethod
    def compile(cls, policy: Authorization) -> CompiledPolicy:
        rules = tuple(tuple(_compile_clause(c) for c in rule) for rule in policy.rules)
        if policy.action == "Deny":
            decision = Decision(False, policy.key, "matched a DENY policy")
        else:
            decision = Decision(True, policy.key, "matched an ALLOW policy")
        return cls(rules, decision)

    def matches(self, subject: _Subject) -> bool:
        return any(_rule_matches(rule, subject) for rule in self.rules)


NO_ALLOW_POLICIES = Decision(True, None, "no ALLOW policies apply")
NO_ALLOW_MATCHED = Decision(False, None, "no ALLOW policy matched")


class PolicySet:
    """The policies that apply to one destination, compiled once and evaluated per connection."""

    def __init__(self, policies: Iterable[Authorization]):
        enforced = [p for p in policies if not p.dry_run]
        self.deny = [CompiledPolicy.compile(p) for p in enforced if p.action == "Deny"]
        self.allow = [CompiledPolicy.compile(p) for p in enforced if p.action == "Allow"]

    def evaluate(self, facts: ConnectionFacts) -> Decision:
        subject = _Subject(facts)
        for policy in self.deny:
            if policy.matches(subject):
                return policy.decision
        if not self.allow:
            return NO_ALLOW_POLICIES
        for policy in self.allow:
            if policy.matches(subject):
                return policy.decision
        return NO_ALLOW_MATCHED


def evaluate(policies: Sequence[Authorization], facts: ConnectionFacts) -> Decision:
    """One-off evaluation; per-connection callers keep a PolicySet or CompiledPolicies instead."""
    return PolicySet(policies).evaluate(facts)


class CompiledPolicies:
    """A PolicySet per workload of a config, built once per config (re)load."""

    def __init__(self, by_workload: dict[str, PolicySet]):
        self._by_workload = by_workload
        self._none = PolicySet(())

    @classmethod
    def from_config(cls, config: LocalConfig) -> CompiledPolicies:
        return cls({w.key: PolicySet(config.policies_for(w)) for w in config.workloads})

    def for_workload(self, workload: Workload) -> PolicySet:
        return self._by_workload.get(workload.key, self._none)

    def evaluate(self, destination: Workload, facts: ConnectionFacts) -> Decision:
        return self.for_workload(destination).evaluate(facts)
