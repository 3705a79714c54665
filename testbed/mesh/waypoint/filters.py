"""Gateway API HTTPRoute filters on whole messages; pure (the pipeline in proxy.py runs them).

Order within a rule, as Envoy applies the Istio translation: a RequestRedirect answers at
once (nothing goes upstream); otherwise RequestHeaderModifier and URLRewrite change the
request, RequestMirror sends a copy of the changed request elsewhere (its answer ignored),
and ResponseHeaderModifier changes the response on its way back. A header modifier sets
(replaces), then adds (appends), then removes, names compared case-insensitively.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.mesh.waypoint.routing import (
    BackendRef,
    HeaderModifier,
    PathModifier,
    RequestRedirect,
    RouteMatch,
    RouteRule,
)

WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def modify_headers(
    headers: Sequence[tuple[str, str]], modifier: HeaderModifier
) -> list[tuple[str, str]]:
    result = list(headers)
    for item in modifier.set:
        name = item.name.lower()
        result = [(n, v) for n, v in result if n != name] + [(name, item.value)]
    result += [(item.name.lower(), item.value) for item in modifier.add]
    removed = {name.lower() for name in modifier.remove}
    return [(n, v) for n, v in result if n not in removed]


def _split(target: str) -> tuple[str, str]:
    """(path, "?query" or "")."""
    path, mark, query = target.partition("?")
    return path or "/", mark + query


def new_path(path: str, modifier: PathModifier, match: RouteMatch) -> str:
    if modifier.type == "ReplaceFullPath":
        return modifier.value
    # ReplacePrefixMatch: the matched prefix (whole path elements) gives way to the value.
    prefix = match.path.value.rstrip("/")
    rest = path[len(prefix) :] if path.startswith(prefix) else path
    joined = modifier.value.rstrip("/") + rest
    return joined if joined.startswith("/") else "/" + joined


def rewrite_request(request: HttpRequest, rule: RouteRule, match: RouteMatch) -> HttpRequest:
    """The request as it goes upstream after the rule's header modifiers and URL rewrite."""
    headers = request.headers
    for f in rule.filter_of("RequestHeaderModifier"):
        assert f.request_header_modifier is not None
        headers = modify_headers(headers, f.request_header_modifier)
    target, authority = request.target, request.authority
    for f in rule.filter_of("URLRewrite"):
        assert f.url_rewrite is not None
        if f.url_rewrite.path is not None:
            path, query = _split(target)
            target = new_path(path, f.url_rewrite.path, match) + query
        if f.url_rewrite.hostname is not None:
            authority = f.url_rewrite.hostname
    return replace(request, headers=list(headers), target=target, authority=authority)


def redirect_response(
    request: HttpRequest, redirect: RequestRedirect, match: RouteMatch, scheme: str = "http"
) -> HttpResponse:
    """The 3xx answer of a RequestRedirect filter, with its `location`."""
    host, _, port_text = request.authority.rpartition(":")
    if not host or not port_text.isdigit():
        host, port_text = request.authority, ""
    to_scheme = redirect.scheme or scheme
    if redirect.port is not None:
        port: int | None = redirect.port
    elif redirect.scheme is not None:
        port = None  # a scheme change takes that scheme's well-known port
    else:
        port = int(port_text) if port_text else None
    hostname = redirect.hostname or host
    path, query = _split(request.target)
    if redirect.path is not None:
        path = new_path(path, redirect.path, match)
    shown = "" if port is None or WELL_KNOWN_PORTS.get(to_scheme) == port else f":{port}"
    location = f"{to_scheme}://{hostname}{shown}{path}{query}"
    return HttpResponse(redirect.status_code, [("location", location)])


def mirror_targets(rule: RouteRule) -> list[tuple[BackendRef, float]]:
    """Where copies of the request go, each with its percentage."""
    return [
        (f.request_mirror.backend_ref, f.request_mirror.percent)
        for f in rule.filter_of("RequestMirror")
        if f.request_mirror is not None
    ]


def mirrored(request: HttpRequest) -> HttpRequest:
    """The copy a mirror receives: Envoy appends "-shadow" to its host."""
    host, colon, port = request.authority.rpartition(":")
    authority = (
        f"{host}-shadow:{port}" if colon and port.isdigit() else f"{request.authority}-shadow"
    )
    return replace(request, authority=authority)


def rewrite_response(response: HttpResponse, rule: RouteRule) -> HttpResponse:
    for f in rule.filter_of("ResponseHeaderModifier"):
        assert f.response_header_modifier is not None
        response.headers = modify_headers(response.headers, f.response_header_modifier)
    return response
