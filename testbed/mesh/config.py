"""The mesh configuration: Istio ztunnel's local config file schema, plus connection-time lookups.

ztunnel can read its workloads, services and policies from a local YAML file instead of xDS
(`LOCAL_XDS_PATH`, struct `LocalConfig` in ztunnel's src/xds.rs). The models here follow its serde
(camelCase) field names and shapes, so a file written for one works with the other:

- workloads: ztunnel `Workload` fields plus `services: {"<ns>/<hostname>": {port: targetPort}}`
- services: `vips` as "<network>/<ip>", `ports: {port: targetPort}`, `endpoints` by workload uid
- policies: `Authorization` with `rules` nested three deep (rule -> clause -> match)

ztunnel parses the file with serde_yaml 0.9, which writes and reads an enum that carries data
(a string match) only as a YAML tag: `!Exact s`, `!Prefix s`, `!Suffix s`, `!Presence []` (an
empty `!Presence` is read too). A map such as `{Exact: s}` makes it reject the whole file, so
YAML files here are written and read in the tagged form only; Python data and JSON (serde_json,
as in ztunnel's config_dump) keep the map form `{"Exact": s}`.

Lookups a proxy does per connection are precomputed into dicts when the config is built.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN, Identity
from testbed.netlab.document import DocumentError, load_document
from testbed.netlab.errors import TestbedError

log = logging.getLogger(__name__)

IpAddress = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network
Port = Annotated[int, Field(ge=0, le=65535)]
HBONE_PORT = 15008
WATCH_INTERVAL_S = 0.5
V = TypeVar("V")
C = TypeVar("C")  # what a ReloadCheck loads


class ConfigError(TestbedError):
    """The mesh config is unreadable or invalid; the message names the file and field."""


def _parse_address(value: object) -> IpAddress:
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address string, got {value!r}")
    return ip_address(value)


def _parse_network(value: object) -> IpNetwork:
    """CIDR like ztunnel's IpNet; host bits may be set and a bare IP means a single host."""
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string like 10.0.0.0/8, got {value!r}")
    return ip_network(value, strict=False)


Address = Annotated[IpAddress, PlainValidator(_parse_address), PlainSerializer(str)]
Network = Annotated[IpNetwork, PlainValidator(_parse_network), PlainSerializer(str)]


@dataclass(frozen=True)
class NetworkAddress:
    """ztunnel's "<network>/<ip>" address form; the network is "" for a flat cluster."""

    network: str
    address: IpAddress

    @classmethod
    def parse(cls, value: object) -> NetworkAddress:
        if isinstance(value, NetworkAddress):
            return value
        if not isinstance(value, str) or "/" not in value:
            raise ValueError(f"expected '<network>/<ip>' (e.g. '/10.96.0.1'), got {value!r}")
        network, _, address = value.partition("/")
        try:
            return cls(network, ip_address(address))
        except ValueError:
            raise ValueError(f"expected '<network>/<ip>', {address!r} is not an IP") from None

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


NetAddress = Annotated[NetworkAddress, PlainValidator(NetworkAddress.parse), PlainSerializer(str)]


def _parse_namespaced_hostname(value: object) -> str:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"expected '<namespace>/<hostname>', got {value!r}")
    return value


NamespacedHostname = Annotated[str, PlainValidator(_parse_namespaced_hostname)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )
    # Fields ztunnel's serde requires although they have a default here: always dumped.
    _ztunnel_required: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump_ztunnel_required(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not self._ztunnel_required:
            return data
        for name in self._ztunnel_required:
            # Only ever left out when equal to its (plain: bool, str, int, [] or {}) default.
            data.setdefault(to_camel(name) if info.by_alias else name, getattr(self, name))
        keys = (to_camel(name) if info.by_alias else name for name in type(self).model_fields)
        return {key: data[key] for key in keys if key in data}  # in declaration order


class GatewayAddress(_Model):
    """A waypoint or network gateway: an address ("<network>/<ip>") or a "<ns>/<hostname>"."""

    destination: NetAddress | NamespacedHostname
    hbone_mtls_port: Port = HBONE_PORT
    _ztunnel_required = ("hbone_mtls_port",)

    @model_validator(mode="before")
    @classmethod
    def _address_before_hostname(cls, data: Any) -> Any:
        # Like ztunnel's untagged enum: a string whose tail is an IP is an address.
        if isinstance(data, dict) and isinstance(data.get("destination"), str):
            try:
                return {**data, "destination": NetworkAddress.parse(data["destination"])}
            except ValueError:
                return data
        return data


class Locality(_Model):
    region: str = ""
    zone: str = ""
    subzone: str = ""
    # ztunnel's Locality has no serde defaults: once written, all three must be there.
    _ztunnel_required = ("region", "zone", "subzone")


class ApplicationTunnel(_Model):
    protocol: Literal["NONE", "PROXY"]
    port: Port | None = None


class Workload(_Model):
    workload_ips: list[Address]
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    protocol: Literal["TCP", "HBONE"] = "TCP"
    network_mode: Literal["Standard", "HostNetwork"] = "Standard"
    uid: str = ""
    name: str = ""
    namespace: str
    trust_domain: str = ""
    service_account: str = ""
    network: str = ""
    workload_name: str = ""
    workload_type: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    hostname: str = ""
    node: str = ""
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    # Policy keys "<namespace>/<name>", for WorkloadSelector-scoped policies.
    authorization_policies: list[str] = []
    status: Literal["Healthy", "Unhealthy"] = "Healthy"
    cluster_id: str = ""
    locality: Locality = Locality()
    # ztunnel's LocalWorkload: "<ns>/<hostname>" -> {service port: target port}.
    services: dict[NamespacedHostname, dict[Port, Port]] = {}
    capacity: int = 1
    _ztunnel_required = ("services",)

    @property
    def identity(self) -> Identity:
        # Local config files usually omit trustDomain; the mesh default applies then.
        td = self.trust_domain or DEFAULT_TRUST_DOMAIN
        return Identity(td, self.namespace, self.service_account or "default")

    @property
    def key(self) -> str:
        """The workload's unique key: its uid, or namespace/name when the uid is omitted."""
        return self.uid or f"{self.namespace}/{self.name}"


class Endpoint(_Model):
    workload_uid: str
    port: dict[Port, Port] = {}
    status: Literal["Healthy", "Unhealthy"] = "Healthy"
    _ztunnel_required = ("port", "status")


class NetworkCidr(BaseModel):
    """A VIP range of a service, ztunnel's NetworkCidr (its serde keeps the Rust field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    network: str
    cidr: Network


class WeightedWaypoint(_Model):
    destination: GatewayAddress
    weight: Annotated[int, Field(ge=0, le=2**32 - 1)]


class LoadBalancer(_Model):
    """ztunnel's LoadBalancer: every field is required there."""

    routing_preferences: list[Literal["Region", "Zone", "Subzone", "Node", "Cluster", "Network"]]
    mode: Literal["Standard", "Strict", "Failover", "Passthrough"]
    health_policy: Literal["OnlyHealthy", "AllowAll"]


class Service(_Model):
    name: str
    namespace: str
    hostname: str
    vips: list[NetAddress] = []
    # Accepted so ztunnel files load; the testbed's proxies do not interpret them.
    cidr_vips: list[NetworkCidr] = []
    ports: dict[Port, Port] = {}
    endpoints: dict[str, Endpoint] = {}
    subject_alt_names: list[str] = []
    waypoint: GatewayAddress | None = None
    # Accepted so ztunnel files load; the testbed's proxies use `waypoint`, the primary.
    weighted_waypoints: list[WeightedWaypoint] = []
    # Accepted so ztunnel files load; the testbed's proxies do not interpret it.
    load_balancer: LoadBalancer | None = None
    ip_families: Literal["Dual", "IPv4", "IPv6"] | None = None
    canonical: bool = False
    visibility: Literal["Public", "Namespace"] = "Public"
    _ztunnel_required = ("vips", "ports")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


MatchKind = Literal["Exact", "Prefix", "Suffix", "Presence"]


class SerdeTag:
    """A serde_yaml externally tagged enum value, `!<variant> <value>`; no value: `!<variant> []`.

    What the mesh-config YAML loader builds for a tag and what the dumper writes one from.
    """

    __slots__ = ("value", "variant")

    def __init__(self, variant: str, value: str | None = None) -> None:
        self.variant = variant
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SerdeTag) and (self.variant, self.value) == (
            other.variant,
            other.value,
        )

    def __hash__(self) -> int:
        return hash((self.variant, self.value))

    def __repr__(self) -> str:
        return f"SerdeTag({self.variant!r}, {self.value!r})"


# Validation/serialization context key: the data is (or becomes) serde_yaml text.
SERDE_YAML = "serde_yaml"
TAGGED_FORMS = "!Exact s, !Prefix s, !Suffix s or !Presence []"


def _is_serde_yaml(info: ValidationInfo | SerializationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get(SERDE_YAML))


class StringMatch(BaseModel):
    """ztunnel's externally tagged StringMatch.

    Read from a serde_yaml tag (mesh-config YAML, where nothing else is accepted), from its
    serde_json/Python map form `{"Exact": s}`, or from Istio's wildcard string form: as in an
    AuthorizationPolicy, "*" means presence, "foo*" a prefix, "*foo" a suffix.
    """

    model_config = ConfigDict(frozen=True)
    kind: MatchKind
    value: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_ztunnel_or_istio(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, SerdeTag):
            return {"kind": data.variant, "value": data.value or ""}
        if _is_serde_yaml(info) and not isinstance(data, StringMatch):
            raise ValueError(
                f"expected a string match in serde_yaml's tagged form ({TAGGED_FORMS}), "
                f"got {data!r}"
            )
        if isinstance(data, str):
            return _from_wildcard(data)
        if isinstance(data, dict) and len(data) == 1 and "kind" not in data:
            ((kind, value),) = data.items()
            return {"kind": kind, "value": "" if kind == "Presence" else value}
        return data

    @model_serializer
    def _to_ztunnel(self, info: SerializationInfo) -> Any:
        if _is_serde_yaml(info):
            return SerdeTag(self.kind, None if self.kind == "Presence" else self.value)
        return {self.kind: [] if self.kind == "Presence" else self.value}

    def matches(self, candidate: str) -> bool:
        if self.kind == "Exact":
            return candidate == self.value
        if self.kind == "Prefix":
            return candidate.startswith(self.value)
        if self.kind == "Suffix":
            return candidate.endswith(self.value)
        return candidate != ""


def _from_wildcard(pattern: str) -> dict[str, str]:
    # istiod's order: a leading "*" wins, so "*/sa/*" is the suffix "/sa/*".
    if pattern == "*":
        return {"kind": "Presence"}
    if pattern.startswith("*"):
        return {"kind": "Suffix", "value": pattern[1:]}
    if pattern.endswith("*"):
        return {"kind": "Prefix", "value": pattern[:-1]}
    return {"kind": "Exact", "value": pattern}


class ServiceAccountMatch(_Model):
    namespace: str
    service_account: str


class RbacMatch(_Model):
    """One match group: every non-empty field must match (any value of it, none of its `not`)."""

    namespaces: list[StringMatch] = []
    not_namespaces: list[StringMatch] = []
    service_accounts: list[ServiceAccountMatch] = []
    not_service_accounts: list[ServiceAccountMatch] = []
    principals: list[StringMatch] = []
    not_principals: list[StringMatch] = []
    source_ips: list[Network] = []
    not_source_ips: list[Network] = []
    destination_ips: list[Network] = []
    not_destination_ips: list[Network] = []
    destination_ports: list[Port] = []
    not_destination_ports: list[Port] = []


class Authorization(_Model):
    name: str
    namespace: str
    scope: Literal["Global", "Namespace", "WorkloadSelector"]
    action: Literal["Allow", "Deny"]
    # rules (any matches) -> clauses (all match) -> match groups (any matches)
    rules: list[list[list[RbacMatch]]] = []
    dry_run: bool = False
    _ztunnel_required = ("rules", "dry_run")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


_TAGS = ("!Exact", "!Prefix", "!Suffix", "!Presence")
_STR_TAG = "tag:yaml.org,2002:str"


class SerdeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus the tags serde_yaml writes for StringMatch variants."""


class SerdeYamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper writing SerdeTag values as serde_yaml does."""

    def choose_scalar_style(self) -> str:
        # PyYAML quotes every scalar with an explicit tag; serde_yaml writes `!Exact value`
        # plain and quotes only what would read as another type untagged ('123', 'true').
        event = self.event
        if (
            isinstance(event, yaml.ScalarEvent)
            and event.tag in _TAGS
            and _resolve(self)(yaml.ScalarNode, event.value, (True, False)) == _STR_TAG
        ):
            implicit = event.implicit
            event.implicit = (True, False)  # allows plain style; the tag is still written
            try:
                return super().choose_scalar_style()
            finally:
                event.implicit = implicit
        return super().choose_scalar_style()


def _resolve(dumper: yaml.SafeDumper) -> Callable[..., str]:
    """The tag an untagged scalar would get (PyYAML's stubs leave `resolve` untyped)."""
    return cast(Callable[..., str], dumper.resolve)


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> SerdeTag:
    variant = node.tag.removeprefix("!")
    if variant == "Presence":
        # serde_yaml reads an empty sequence or an empty plain scalar as the empty tuple.
        empty = isinstance(node, yaml.SequenceNode) and not node.value
        empty |= isinstance(node, yaml.ScalarNode) and node.value == "" and node.style is None
        if not empty:
            raise yaml.constructor.ConstructorError(
                None, None, "!Presence takes no value (write !Presence [])", node.start_mark
            )
        return SerdeTag(variant)
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"!{variant} takes a string (write !{variant} value)", node.start_mark
        )
    return SerdeTag(variant, loader.construct_scalar(node))


def _represent_tagged(dumper: yaml.SafeDumper, tag: SerdeTag) -> yaml.Node:
    if tag.value is None:
        return dumper.represent_sequence(f"!{tag.variant}", [], flow_style=True)
    return dumper.represent_scalar(f"!{tag.variant}", tag.value)


for _tag in _TAGS:
    SerdeYamlLoader.add_constructor(_tag, _construct_tagged)
SerdeYamlDumper.add_representer(SerdeTag, _represent_tagged)


class LocalConfig(_Model):
    workloads: list[Workload] = []
    policies: list[Authorization] = []
    services: list[Service] = []

    _index: _Index = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._index = _Index.build(self)

    @classmethod
    def load(cls, path: Path) -> LocalConfig:
        try:
            text = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
        if path.suffix == ".json":
            try:  # bounded: not UTF-8, too deep, alias bombs are one error (found by fuzzing)
                data = load_document(text, as_json=True, kind="json")
            except DocumentError as e:
                raise ConfigError(f"{path}: {e}") from e
            return cls._validate(data, {}, str(path))
        return cls.from_yaml(text, str(path))

    @classmethod
    def from_yaml(cls, text: bytes | str, where: str = "<mesh config>") -> LocalConfig:
        """Parse serde_yaml-style text (string matches as tags); errors start with `where`."""
        try:
            data = load_document(text, kind="yaml", loader=SerdeYamlLoader)
        except DocumentError as e:
            raise ConfigError(f"{where}: {e}") from e
        return cls._validate(data, {SERDE_YAML: True}, where)

    @classmethod
    def _validate(cls, data: Any, context: dict[str, Any], where: str) -> LocalConfig:
        try:
            return cls.model_validate(data or {}, context=context)
        except ValidationError as e:
            raise ConfigError(f"{where}: {_describe(e)}") from e
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e

    def dump_yaml(self) -> str:
        """The file as Istio's ztunnel reads it (serde_yaml 0.9: string matches as tags)."""
        # Python mode keeps integer port keys (ztunnel's serde wants numbers, not "80").
        data = self.model_dump(by_alias=True, exclude_defaults=True, context={SERDE_YAML: True})
        return yaml.dump(data, Dumper=SerdeYamlDumper, sort_keys=False)

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The workload with this IP, given in canonical text form (as socket returns it)."""
        return self._index.workloads_by_ip.get(ip)

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._index.workloads_by_key.get(uid)

    def service_by_vip(self, ip: str, port: int) -> Service | None:
        """The service with this VIP that exposes `port`; None for an unknown VIP or port."""
        service = self._index.services_by_vip.get(ip)
        return service if service is not None and port in service.ports else None

    def service_by_host(self, namespaced_hostname: str) -> Service | None:
        return self._index.services_by_key.get(namespaced_hostname)

    def endpoints(self, service: Service, port: int) -> list[tuple[Workload, int]]:
        """Healthy endpoints of `service` for service port `port`, with their target ports."""
        return self._index.endpoints.get((service.key, port), [])

    def policies_for(self, workload: Workload) -> list[Authorization]:
        """Policies that apply to connections to `workload`, as ztunnel selects them."""
        return self._index.policies_by_workload.get(workload.key, [])

    def waypoint_address(self, gateway: GatewayAddress) -> tuple[str, int] | None:
        """Where to send HBONE for a waypoint: its IP (a hostname's first VIP) and port."""
        if isinstance(gateway.destination, NetworkAddress):
            return str(gateway.destination.address), gateway.hbone_mtls_port
        service = self.service_by_host(gateway.destination)
        if service is None or not service.vips:
            return None
        return str(service.vips[0].address), gateway.hbone_mtls_port

    def waypoint_for_workload(self, workload: Workload) -> tuple[str, int] | None:
        return None if workload.waypoint is None else self.waypoint_address(workload.waypoint)

    def waypoint_for_service(self, service: Service) -> tuple[str, int] | None:
        return None if service.waypoint is None else self.waypoint_address(service.waypoint)


@dataclass
class _Index:
    workloads_by_ip: dict[str, Workload]
    workloads_by_key: dict[str, Workload]
    services_by_vip: dict[str, Service]
    services_by_key: dict[str, Service]
    endpoints: dict[tuple[str, int], list[tuple[Workload, int]]]
    policies_by_workload: dict[str, list[Authorization]]

    @classmethod
    def build(cls, config: LocalConfig) -> _Index:
        index = cls({}, {}, {}, {}, {}, {})
        for i, workload in enumerate(config.workloads):
            index._add_workload(f"workloads[{i}]", workload)
        for i, service in enumerate(config.services):
            index._add_service(f"services[{i}]", service)
        index._add_endpoints_of_workloads(config.workloads)
        index._add_endpoints_of_services(config.services)
        index._select_policies(config.policies)
        return index

    def _add_workload(self, where: str, workload: Workload) -> None:
        _put_unique(self.workloads_by_key, workload.key, workload, f"{where}.uid")
        for ip in workload.workload_ips:
            _put_unique(self.workloads_by_ip, str(ip), workload, f"{where}.workloadIps")

    def _add_service(self, where: str, service: Service) -> None:
        _put_unique(self.services_by_key, service.key, service, f"{where}.hostname")
        for vip in service.vips:
            _put_unique(self.services_by_vip, str(vip.address), service, f"{where}.vips")

    def _add_endpoints_of_workloads(self, workloads: list[Workload]) -> None:
        for i, workload in enumerate(workloads):
            for service_key, ports in workload.services.items():
                service = self.services_by_key.get(service_key)
                if service is None:
                    raise ConfigError(
                        f"workloads[{i}].services: no service {service_key!r} "
                        "(expected '<namespace>/<hostname>' of an entry in services)"
                    )
                self._add_endpoint(service, workload, ports, workload.status)

    def _add_endpoints_of_services(self, services: list[Service]) -> None:
        for i, service in enumerate(services):
            for uid, endpoint in service.endpoints.items():
                workload = self.workloads_by_key.get(endpoint.workload_uid)
                if workload is None:
                    raise ConfigError(f"services[{i}].endpoints.{uid}: no workload with that uid")
                self._add_endpoint(service, workload, endpoint.port, endpoint.status)

    def _add_endpoint(
        self, service: Service, workload: Workload, ports: dict[int, int], status: str
    ) -> None:
        if status != "Healthy":
            return
        for service_port, service_target in service.ports.items():
            # As ztunnel: the endpoint's own mapping wins, else the service's target port.
            target = ports.get(service_port) or service_target
            if target:
                self.endpoints.setdefault((service.key, service_port), []).append(
                    (workload, target)
                )

    def _select_policies(self, policies: list[Authorization]) -> None:
        by_key = {p.key: p for p in policies}
        global_policies = [p for p in policies if p.scope == "Global"]
        for workload in self.workloads_by_key.values():
            selected = [p for p in policies if p.scope == "Namespace"]
            selected = [p for p in selected if p.namespace == workload.namespace]
            selected += global_policies
            for key in workload.authorization_policies:
                if key not in by_key:
                    raise ConfigError(
                        f"workload {workload.key}: authorizationPolicies names unknown policy "
                        f"{key!r} (expected '<namespace>/<name>' of an entry in policies)"
                    )
                selected.append(by_key[key])
            self.policies_by_workload[workload.key] = list({p.key: p for p in selected}.values())


def _put_unique(table: dict[str, V], key: str, value: V, where: str) -> None:
    if key in table:
        raise ConfigError(f"{where}: duplicate {key!r}")
    table[key] = value


def _describe(error: ValidationError) -> str:
    """Pydantic errors as 'field.path: what was expected (got ...)', joined by '; '."""
    return "; ".join(_describe_one(e) for e in error.errors(include_url=False))


def _describe_one(e: ErrorDetails) -> str:
    where = ""
    for part in e["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        else:
            where += part if part == "[key]" else f".{part}"
    # Value errors come from our validators and ipaddress, which quote the input already.
    if e["type"] == "value_error":
        what = e["msg"].removeprefix("Value error, ")
    else:
        what = f"{e['msg']} (got {e['input']!r})"
    return f"{where.lstrip('.') or '(top level)'}: {what}"


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced; None if it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ReloadCheck(Generic[C]):
    """Loads the file again when its signature changes; keeps the previous version when the
    new one is invalid (a process never runs half a config). `what` names it in that log."""

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], C],
        on_change: Callable[[C], None],
        what: str = "config",
    ):
        self.path = path
        self.load = load
        self.on_change = on_change
        self.what = what
        self.signature = file_signature(path)

    def poll(self) -> None:
        signature = file_signature(self.path)
        if signature == self.signature or signature is None:
            return
        self.signature = signature
        try:
            config = self.load(self.path)
        except ConfigError as e:
            log.error("keeping the previous %s: %s", self.what, e)
            return
        self.on_change(config)


class ConfigWatcher:
    """Calls `on_change(new_config)` from a thread whenever the file changes validly."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[LocalConfig], None],
        interval: float = WATCH_INTERVAL_S,
    ):
        self._check = ReloadCheck(path, LocalConfig.load, on_change, "mesh config")
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {path}", daemon=True)

    def start(self) -> ConfigWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._check.poll()
