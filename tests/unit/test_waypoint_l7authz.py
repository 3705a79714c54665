"""Waypoint L7 authorization (pure): Istio's ALLOW/DENY semantics on HTTP and on plain TCP."""

from __future__ import annotations

from testbed.mesh.waypoint.l7authz import L7Policies, L7Policy, Subject
from testbed.mesh.waypoint.routing import RequestFacts

SVC = "default/reviews.default.svc.cluster.local"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
OTHER = "spiffe://cluster.local/ns/other/sa/intruder"


def policy(action: str, *rules: dict[str, object], targets: tuple[str, ...] = ()) -> L7Policy:
    data = {"name": f"p-{action.lower()}", "action": action, "targets": list(targets)}
    return L7Policy.model_validate({**data, "rules": list(rules)})


def http(identity: str | None, method: str, path: str, **headers: str) -> Subject:
    return Subject.from_identity(identity, 9080, RequestFacts.of(method, path, headers.items()))


def allowed(policies: list[L7Policy], subject: Subject, service: str = SVC) -> bool:
    return L7Policies(policies, service).evaluate(subject).allowed


def test_deny_on_path_only_denies_that_path() -> None:
    deny_admin = policy("DENY", {"to": [{"paths": ["/admin*"]}]})
    assert not allowed([deny_admin], http(CLIENT, "GET", "/admin/users"))
    assert allowed([deny_admin], http(CLIENT, "GET", "/reviews"))


def test_allow_by_principal_and_method_denies_the_rest() -> None:
    allow = policy(
        "ALLOW",
        {"from": [{"principals": ["cluster.local/ns/default/sa/client"]}],
         "to": [{"methods": ["GET"], "paths": ["/reviews*"]}]},
    )  # fmt: skip
    assert allowed([allow], http(CLIENT, "GET", "/reviews/1"))
    assert not allowed([allow], http(CLIENT, "DELETE", "/reviews/1"))
    assert not allowed([allow], http(OTHER, "GET", "/reviews/1"))
    assert not allowed([allow], http(None, "GET", "/reviews/1"))


def test_namespaces_not_values_and_header_conditions() -> None:
    deny = policy(
        "DENY",
        {"from": [{"notNamespaces": ["default"]}]},
        {"when": [{"key": "request.headers[x-token]", "notValues": ["secret"]}],
         "to": [{"paths": ["/private"]}]},
    )  # fmt: skip
    assert not allowed([deny], http(OTHER, "GET", "/"))
    assert allowed([deny], http(CLIENT, "GET", "/private", **{"x-token": "secret"}))
    assert not allowed([deny], http(CLIENT, "GET", "/private", **{"x-token": "guess"}))
    assert not allowed([deny], http(CLIENT, "GET", "/private"))


def test_deny_wins_over_allow_and_targets_scope_policies() -> None:
    allow_all = policy("ALLOW", {})
    deny_here = policy("DENY", {"to": [{"methods": ["POST"]}]}, targets=(SVC,))
    assert not allowed([allow_all, deny_here], http(CLIENT, "POST", "/"))
    assert allowed([allow_all, deny_here], http(CLIENT, "POST", "/"), service="default/other")
    assert not allowed([policy("ALLOW")], http(CLIENT, "GET", "/"))  # no rules: allow nothing


def test_plain_tcp_allow_needs_no_http_fields_deny_ignores_them() -> None:
    tcp = Subject.from_identity(CLIENT, 9080)
    http_only_allow = policy("ALLOW", {"to": [{"methods": ["GET"]}]})
    assert not allowed([http_only_allow], tcp)
    port_allow = policy("ALLOW", {"to": [{"ports": [9080]}]})
    assert allowed([port_allow], tcp)
    http_only_deny = policy("DENY", {"to": [{"paths": ["/admin"]}]})
    assert not allowed([http_only_deny], tcp)


def test_subject_from_identity() -> None:
    subject = Subject.from_identity(CLIENT, 80)
    assert subject.principal == "cluster.local/ns/default/sa/client"
    assert subject.namespace == "default"
    assert Subject.from_identity("not-spiffe", 80).principal is None
