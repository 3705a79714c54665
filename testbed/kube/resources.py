"""Typed models of the Istio and Gateway API resources the testbed reads and writes.

Written from the APIs' reference documentation (security.istio.io/v1 AuthorizationPolicy,
gateway.networking.k8s.io/v1 Gateway and HTTPRoute), with only the fields the testbed can
honour: every model forbids unknown fields, so a field outside this subset is an error that
names its path, never silently dropped. Kubernetes' own field names (camelCase) are used
as aliases; Python attributes are snake_case.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ISTIO_SECURITY: Final = "security.istio.io/v1"
GATEWAY_API: Final = "gateway.networking.k8s.io/v1"
GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
WAYPOINT_CLASS: Final = "istio-waypoint"
HBONE_PORT: Final = 15008


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The Kubernetes form: camelCase keys, unset fields left out."""
        data: dict[str, Any] = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        return data


class ObjectMeta(_Model):
    name: str
    namespace: str = "default"
    labels: dict[str, str] | None = None


# ---------------------------------------------------------------- AuthorizationPolicy


class Source(_Model):
    principals: list[str] | None = None
    not_principals: list[str] | None = None
    namespaces: list[str] | None = None
    not_namespaces: list[str] | None = None
    ip_blocks: list[str] | None = None
    not_ip_blocks: list[str] | None = None


class From(_Model):
    source: Source


class Operation(_Model):
    ports: list[str] | None = None  # Istio writes ports as strings
    not_ports: list[str] | None = None
    methods: list[str] | None = None
    not_methods: list[str] | None = None
    paths: list[str] | None = None
    not_paths: list[str] | None = None


class To(_Model):
    operation: Operation


class Condition(_Model):
    key: str
    values: list[str] | None = None
    not_values: list[str] | None = None


class Rule(_Model):
    from_: list[From] | None = Field(default=None, alias="from")
    to: list[To] | None = None
    when: list[Condition] | None = None


class WorkloadSelector(_Model):
    match_labels: dict[str, str]


class PolicyTargetReference(_Model):
    group: str = ""
    kind: Literal["Service", "Gateway"]
    name: str


class AuthorizationPolicySpec(_Model):
    selector: WorkloadSelector | None = None
    target_refs: list[PolicyTargetReference] | None = None
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: list[Rule] | None = None


class AuthorizationPolicy(_Model):
    api_version: Literal["security.istio.io/v1"] = ISTIO_SECURITY
    kind: Literal["AuthorizationPolicy"] = "AuthorizationPolicy"
    metadata: ObjectMeta
    spec: AuthorizationPolicySpec = Field(default_factory=AuthorizationPolicySpec)


# ---------------------------------------------------------------- Gateway (waypoint)


class Listener(_Model):
    name: Literal["mesh"] = "mesh"
    port: Literal[15008] = HBONE_PORT
    protocol: Literal["HBONE"] = "HBONE"


class GatewaySpec(_Model):
    gateway_class_name: Literal["istio-waypoint"] = WAYPOINT_CLASS
    listeners: list[Listener] = Field(default_factory=lambda: [Listener()], min_length=1)


class Gateway(_Model):
    api_version: Literal["gateway.networking.k8s.io/v1"] = GATEWAY_API
    kind: Literal["Gateway"] = "Gateway"
    metadata: ObjectMeta
    spec: GatewaySpec = Field(default_factory=GatewaySpec)


# ---------------------------------------------------------------- HTTPRoute


class ParentReference(_Model):
    group: Literal[""] = ""
    kind: Literal["Service"] = "Service"
    name: str
    namespace: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)


class HTTPPathMatch(_Model):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"


class HTTPHeaderMatch(_Model):
    type: Literal["Exact"] = "Exact"
    name: str
    value: str


class HTTPRouteMatch(_Model):
    path: HTTPPathMatch | None = None
    headers: list[HTTPHeaderMatch] | None = None
    method: str | None = None


class HTTPBackendRef(_Model):
    group: Literal[""] = ""
    kind: Literal["Service"] = "Service"
    name: str
    namespace: str | None = None
    port: int = Field(ge=1, le=65535)  # required for a Service (the CRD's validation rule)
    weight: int | None = Field(default=None, ge=0)


class HTTPRouteTimeouts(_Model):
    request: str  # a Gateway API duration, e.g. "2s" or "500ms"


class HTTPRouteRule(_Model):
    matches: list[HTTPRouteMatch] | None = None
    backend_refs: list[HTTPBackendRef] | None = None
    timeouts: HTTPRouteTimeouts | None = None


class HTTPRouteSpec(_Model):
    parent_refs: list[ParentReference] = Field(min_length=1)
    rules: list[HTTPRouteRule] | None = None


class HTTPRoute(_Model):
    api_version: Literal["gateway.networking.k8s.io/v1"] = GATEWAY_API
    kind: Literal["HTTPRoute"] = "HTTPRoute"
    metadata: ObjectMeta
    spec: HTTPRouteSpec


# ---------------------------------------------------------------- label patches


class LabelPatchMeta(_Model):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class LabelPatch(_Model):
    """A Namespace, Service or Pod given for its labels only (istio.io/dataplane-mode,
    istio.io/use-waypoint): `kubectl apply` of it sets those labels."""

    api_version: Literal["v1"] = "v1"
    kind: Literal["Namespace", "Service", "Pod"]
    metadata: LabelPatchMeta


IstioResource = AuthorizationPolicy | Gateway | HTTPRoute | LabelPatch
KINDS: dict[tuple[str, str], type[IstioResource]] = {
    (ISTIO_SECURITY, "AuthorizationPolicy"): AuthorizationPolicy,
    (GATEWAY_API, "Gateway"): Gateway,
    (GATEWAY_API, "HTTPRoute"): HTTPRoute,
    ("v1", "Namespace"): LabelPatch,
    ("v1", "Service"): LabelPatch,
    ("v1", "Pod"): LabelPatch,
}
