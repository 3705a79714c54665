"""HTTPRoute coverage (pure): RegularExpression paths, query parameter matches, the Gateway
API precedence cases, each filter on whole messages, Istio's default retry policy, and
unsupported features refused by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from testbed.mesh.waypoint import filters
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.routing import (
    HttpRoute,
    RequestFacts,
    RetryPolicy,
    RouteMatch,
    RouteRule,
    RouteTable,
)

SVC = "default/reviews.default.svc.cluster.local"


def facts(target: str = "/", method: str = "GET", **headers: str) -> RequestFacts:
    return RequestFacts.of(method, target, headers.items())


def named(name: str, matches: list[dict[str, Any]], namespace: str = "default") -> HttpRoute:
    rule = {"matches": matches, "backends": [{"service": name}]}
    return HttpRoute.model_validate(
        {"name": name, "namespace": namespace, "parents": [SVC], "rules": [rule]}
    )


def winner(table: RouteTable, request: RequestFacts) -> str | None:
    selected = table.select(request)
    return None if selected is None else selected[1].backends[0].service


def path(kind: str, value: str) -> dict[str, Any]:
    return {"path": {"type": kind, "value": value}}


# ------------------------------------------------------------------ matches


def test_regular_expression_matches_the_whole_path() -> None:
    table = RouteTable.build([named("re", [path("RegularExpression", r"/v[0-9]+/.*")])], SVC)
    assert winner(table, facts("/v2/items?x=1")) == "re"
    assert winner(table, facts("/api/v2/items")) is None  # not anchored at the start
    assert winner(table, facts("/v2")) is None  # the whole path must match


def test_query_parameter_and_regex_header_matches() -> None:
    match = {
        "queryParams": [{"name": "debug", "value": "1"}],
        "headers": [{"type": "RegularExpression", "name": "user", "value": "jason|kim"}],
    }
    table = RouteTable.build([named("q", [match])], SVC)
    assert winner(table, facts("/?debug=1&x=2", user="jason")) == "q"
    assert winner(table, facts("/?debug=0", user="jason")) is None
    assert winner(table, facts("/?debug=1", user="jasonx")) is None
    assert winner(table, facts("/?Debug=1", user="kim")) is None  # names are case-sensitive


# ------------------------------------------------------------------ precedence (Gateway API)

PRECEDENCE_CASES = [
    # (routes as (name, matches), request, expected winner)
    ([("prefix", [path("PathPrefix", "/foo")]), ("exact", [path("Exact", "/foo")])],
     facts("/foo"), "exact"),
    ([("short", [path("PathPrefix", "/foo")]), ("long", [path("PathPrefix", "/foo/bar")])],
     facts("/foo/bar/baz"), "long"),
    ([("any", [path("PathPrefix", "/")]), ("get", [{**path("PathPrefix", "/"), "method": "GET"}])],
     facts("/x"), "get"),
    ([("one", [{"headers": [{"name": "a", "value": "1"}]}]),
      ("two", [{"headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}])],
     facts("/", a="1", b="2"), "two"),
    ([("noq", [{"headers": [{"name": "a", "value": "1"}]}]),
      ("q", [{"headers": [{"name": "a", "value": "1"}],
              "queryParams": [{"name": "k", "value": "v"}]}])],
     facts("/?k=v", a="1"), "q"),
    # a method outranks headers, and a longer prefix outranks a method
    ([("hdr", [{"headers": [{"name": "a", "value": "1"}]}]), ("m", [{"method": "GET"}])],
     facts("/", a="1"), "m"),
    ([("m", [{**path("PathPrefix", "/a"), "method": "GET"}]),
      ("long", [path("PathPrefix", "/a/b")])],
     facts("/a/b"), "long"),
    # full ties: the route created (declared) first wins, whatever its name
    ([("zeta", [path("PathPrefix", "/p")]), ("alpha", [path("PathPrefix", "/p")])],
     facts("/p"), "zeta"),
    # regular expressions rank below any prefix (Istio's order; the spec leaves it open)
    ([("re", [path("RegularExpression", "/p.*")]), ("root", [path("PathPrefix", "/")])],
     facts("/pq"), "root"),
]  # fmt: skip


@pytest.mark.parametrize(("routes", "request_facts", "expected"), PRECEDENCE_CASES)
def test_gateway_api_precedence(
    routes: list[tuple[str, list[dict[str, Any]]]], request_facts: RequestFacts, expected: str
) -> None:
    table = RouteTable.build([named(name, matches) for name, matches in routes], SVC)
    assert winner(table, request_facts) == expected


def test_within_a_route_the_first_rule_wins_a_tie() -> None:
    rules = [{"backends": [{"service": "first"}]}, {"backends": [{"service": "second"}]}]
    route = HttpRoute.model_validate({"name": "r", "parents": [SVC], "rules": rules})
    assert winner(RouteTable.build([route], SVC), facts("/")) == "first"


# ------------------------------------------------------------------ filters


def rule(*fs: Mapping[str, Any], matches: list[dict[str, Any]] | None = None) -> RouteRule:
    return RouteRule.model_validate({"matches": matches or [], "filters": list(fs)})


def request(target: str = "/foo/bar?q=1", **headers: str) -> HttpRequest:
    return HttpRequest("GET", target, "reviews:9080", list(headers.items()))


def test_request_header_modifier_sets_adds_removes() -> None:
    modifier = {"set": [{"name": "X-Set", "value": "new"}],
                "add": [{"name": "x-add", "value": "2"}], "remove": ["X-Gone"]}  # fmt: skip
    r = rule({"type": "RequestHeaderModifier", "requestHeaderModifier": modifier})
    original = request(**{"x-set": "old", "x-add": "1", "x-gone": "bye", "x-keep": "k"})
    changed = filters.rewrite_request(original, r, RouteMatch())
    assert sorted(changed.headers) == [("x-add", "1"), ("x-add", "2"), ("x-keep", "k"),
                                       ("x-set", "new")]  # fmt: skip
    assert ("x-gone", "bye") in original.headers  # the original is untouched


def test_response_header_modifier() -> None:
    modifier = {"set": [{"name": "server", "value": "mesh"}], "remove": ["x-internal"]}
    r = rule({"type": "ResponseHeaderModifier", "responseHeaderModifier": modifier})
    response = HttpResponse(200, [("server", "app"), ("x-internal", "1"), ("x-ok", "1")])
    assert filters.rewrite_response(response, r).headers == [("x-ok", "1"), ("server", "mesh")]


def test_url_rewrite_prefix_full_path_and_hostname() -> None:
    prefix_match = [path("PathPrefix", "/foo")]
    by_prefix = rule(
        {"type": "URLRewrite", "urlRewrite": {"hostname": "ratings",
         "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
        matches=prefix_match,
    )  # fmt: skip
    changed = filters.rewrite_request(request(), by_prefix, by_prefix.matches[0])
    assert (changed.target, changed.authority) == ("/v2/bar?q=1", "ratings")
    to_root = rule({"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch",
                    "replacePrefixMatch": "/"}}}, matches=prefix_match)  # fmt: skip
    assert filters.rewrite_request(request("/foo"), to_root, to_root.matches[0]).target == "/"
    assert filters.rewrite_request(request(), to_root, to_root.matches[0]).target == "/bar?q=1"
    full = rule({"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath",
                 "replaceFullPath": "/other"}}})  # fmt: skip
    assert filters.rewrite_request(request(), full, RouteMatch()).target == "/other?q=1"


def test_request_redirect_builds_the_location() -> None:
    def location(redirect: dict[str, Any], target: str = "/foo/bar?q=1") -> tuple[int, str]:
        r = rule({"type": "RequestRedirect", "requestRedirect": redirect},
                 matches=[path("PathPrefix", "/foo")])  # fmt: skip
        assert r.filters[0].request_redirect is not None
        answer = filters.redirect_response(request(target), r.filters[0].request_redirect,
                                           r.matches[0])  # fmt: skip
        return answer.status, dict(answer.headers)["location"]

    assert location({}) == (302, "http://reviews:9080/foo/bar?q=1")
    assert location({"scheme": "https", "statusCode": 301}) == (
        301,
        "https://reviews/foo/bar?q=1",
    )
    assert location({"hostname": "example.com", "port": 80}) == (
        302,
        "http://example.com/foo/bar?q=1",
    )
    prefix = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}
    assert location(prefix)[1] == "http://reviews:9080/new/bar?q=1"


def test_request_mirror_targets_and_shadow_host() -> None:
    mirror = {"backendRef": {"service": "default/shadow.default.svc.cluster.local", "port": 80}}
    r = rule({"type": "RequestMirror", "requestMirror": mirror})
    [(backend, percent)] = filters.mirror_targets(r)
    assert (backend.service, backend.port, percent) == (mirror["backendRef"]["service"], 80, 100)
    assert filters.mirrored(request()).authority == "reviews-shadow:9080"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("rules", "named_in_error"),
    [
        ([{"filters": [{"type": "CORS", "cors": {}}]}], "'CORS' is not supported"),
        ([{"filters": [{"type": "ExtensionRef"}]}], "'ExtensionRef' is not supported"),
        ([{"filters": [{"type": "URLRewrite"}]}], "needs urlRewrite"),
        ([{"filters": [{"type": "RequestRedirect", "requestRedirect": {},
                        "urlRewrite": {}}]}], "and no other field"),
        ([{"filters": [{"type": "RequestRedirect", "requestRedirect": {}},
                       {"type": "URLRewrite", "urlRewrite": {}}]}], "cannot be used together"),
        ([{"matches": [path("Exact", "/a")], "filters": [{"type": "URLRewrite", "urlRewrite": {
            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}]}],
         "ReplacePrefixMatch needs PathPrefix"),
        ([{"matches": [path("RegularExpression", "/(")]}], "does not compile"),
        ([{"matches": [path("Suffix", "/a")]}], "RegularExpression"),
        ([{"sessionPersistence": {}}], "sessionPersistence"),
    ],
)  # fmt: skip
def test_unsupported_or_wrong_features_are_refused_by_name(
    rules: list[dict[str, Any]], named_in_error: str
) -> None:
    with pytest.raises(ValidationError, match=named_in_error):
        WaypointConfig.model_validate({"routes": [{"name": "r", "parents": [SVC], "rules": rules}]})


def test_default_retry_policy_is_istios() -> None:
    default = RetryPolicy()
    assert default.attempts == 2
    assert default.should_retry(1, 503) and default.should_retry(2, 503)
    assert not default.should_retry(3, 503)
    assert not default.should_retry(1, 500) and not default.should_retry(1, 502)
    assert default.should_retry(1, None, "connect-failure")
    assert default.should_retry(1, None, "refused-stream")
    assert not default.should_retry(1, None, "reset")  # not in Istio's default list
    assert default.should_retry(1, 200, grpc="14") and default.should_retry(1, 200, grpc="1")
    assert not default.should_retry(1, 200, grpc="0")
    five_xx = RetryPolicy(retry_on=["5xx"])
    assert five_xx.should_retry(1, 500) and five_xx.should_retry(1, None, "reset")
