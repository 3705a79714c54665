"""Waypoint routing (pure): matches and precedence, weighted picks, retries, faults."""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping

import pytest
from pydantic import ValidationError

from testbed.mesh.waypoint.routing import (
    Backend,
    FaultInjection,
    HttpRoute,
    RequestFacts,
    RetryPolicy,
    RouteTable,
    pick_weighted,
    plan_fault,
)

SVC = "default/reviews.default.svc.cluster.local"


def request(method: str = "GET", target: str = "/", **headers: str) -> RequestFacts:
    return RequestFacts.of(method, target, headers.items())


def route(*rules: Mapping[str, object], parents: tuple[str, ...] = (SVC,)) -> HttpRoute:
    return HttpRoute.model_validate({"name": "r", "parents": list(parents), "rules": list(rules)})


def backend_of(table: RouteTable, facts: RequestFacts) -> str | None:
    selected = table.select(facts)
    return None if selected is None else selected[1].backends[0].service


def test_path_prefix_matches_whole_segments_and_exact_beats_prefix() -> None:
    table = RouteTable.build(
        [
            route(
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "backends": [{"service": "prefix"}]},
                {"matches": [{"path": {"type": "Exact", "value": "/api/v2"}}],
                 "backends": [{"service": "exact"}]},
                {"backends": [{"service": "default"}]},
            )
        ],
        SVC,
    )  # fmt: skip
    assert backend_of(table, request(target="/api/v2")) == "exact"
    assert backend_of(table, request(target="/api/v2/x?q=1")) == "prefix"
    assert backend_of(table, request(target="/api")) == "prefix"
    assert backend_of(table, request(target="/apix")) == "default"


def test_longer_prefix_then_method_then_more_headers_win() -> None:
    table = RouteTable.build(
        [
            route(
                {"matches": [{"path": {"value": "/"}}], "backends": [{"service": "root"}]},
                {"matches": [{"path": {"value": "/a/b"}}], "backends": [{"service": "long"}]},
                {"matches": [{"path": {"value": "/a"}, "method": "POST"}],
                 "backends": [{"service": "post"}]},
                {"matches": [{"path": {"value": "/a"}, "method": "POST",
                              "headers": [{"name": "X-User", "value": "jason"}]}],
                 "backends": [{"service": "jason"}]},
            )
        ],
        SVC,
    )  # fmt: skip
    assert backend_of(table, request("POST", "/a/b/c")) == "long"
    assert backend_of(table, request("POST", "/a/c", **{"x-user": "jason"})) == "jason"
    assert backend_of(table, request("post", "/a/c", **{"x-user": "bob"})) == "post"
    assert backend_of(table, request("GET", "/a/c")) == "root"


def test_routes_of_other_services_are_ignored_and_unmatched_gives_none() -> None:
    only_v2 = {"matches": [{"path": {"type": "Exact", "value": "/v2"}}], "backends": []}
    table = RouteTable.build(
        [route(only_v2), route({"backends": [{"service": "x"}]}, parents=("other/svc",))], SVC
    )
    assert table.select(request(target="/v1")) is None
    assert table.select(request(target="/v2")) is not None
    assert RouteTable.build([route(only_v2)], "default/unrouted").empty


def test_path_must_be_absolute() -> None:
    with pytest.raises(ValidationError, match="must start with"):
        route({"matches": [{"path": {"value": "api"}}]})


def test_weighted_pick_follows_weights() -> None:
    backends = [Backend(service="v1", weight=80), Backend(service="v2", weight=20)]
    rng = random.Random(7)
    picks = [pick_weighted(backends, rng.random) for _ in range(10_000)]
    share = sum(1 for b in picks if b is not None and b.service == "v1") / len(picks)
    assert 0.78 < share < 0.82
    assert pick_weighted(backends, lambda: 0.0) is backends[0]
    assert pick_weighted(backends, lambda: 0.9999999) is backends[1]


def test_zero_weights_are_never_picked() -> None:
    backends = [Backend(service="off", weight=0), Backend(service="on", weight=3)]
    for point in (0.0, 0.1, 0.5, 0.9, 0.99):
        assert pick_weighted(backends, functools.partial(float, point)) is backends[1]
    assert pick_weighted([Backend(service="off", weight=0)], lambda: 0.5) is None


def test_retry_policy_counts_attempts_and_conditions() -> None:
    policy = RetryPolicy(attempts=2)
    assert policy.should_retry(1, 503) and policy.should_retry(2, None)
    assert not policy.should_retry(3, 503)
    assert not policy.should_retry(1, 404)
    only_connect = RetryPolicy(attempts=1, retry_on=["connect-failure"])
    assert only_connect.should_retry(1, None) and not only_connect.should_retry(1, 503)
    assert not RetryPolicy(attempts=0).should_retry(1, 503)


def test_fault_plan_uses_percentages() -> None:
    fault = FaultInjection.model_validate(
        {"delay": {"fixedDelay": 2.0, "percentage": 50}, "abort": {"httpStatus": 503,
                                                                     "percentage": 10}}
    )  # fmt: skip
    assert plan_fault(fault, lambda: 0.05).delay == 2.0
    assert plan_fault(fault, lambda: 0.05).abort_status == 503
    assert plan_fault(fault, lambda: 0.3).abort_status is None
    assert plan_fault(fault, lambda: 0.6).delay == 0.0
    assert plan_fault(None, lambda: 0.0).abort_status is None
