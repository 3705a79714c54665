import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.mesh.ca import Identity
from testbed.mesh.config import (
    ConfigError,
    ConfigWatcher,
    LocalConfig,
    NetworkAddress,
    SerdeTag,
    SerdeYamlDumper,
    SerdeYamlLoader,
    StringMatch,
)

# A small cluster in ztunnel's local config shape: sleep -> httpbin service (with a waypoint).
CLUSTER_YAML = """
workloads:
- uid: c1//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.0.1.2"]
  protocol: HBONE
  node: node-a
  authorizationPolicies: [default/sleep-only]
  services: {}
- uid: c1//v1/Pod/default/httpbin
  name: httpbin
  namespace: default
  serviceAccount: httpbin
  trustDomain: cluster.local
  workloadIps: ["10.0.2.2"]
  protocol: HBONE
  node: node-b
  waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
  services:
    "default/httpbin.default.svc.cluster.local":
      8000: 80
- uid: c1//v1/Pod/default/httpbin-alt
  name: httpbin-alt
  namespace: default
  workloadIps: ["10.0.2.3"]
  services: {}
- uid: c1//v1/Pod/default/httpbin-sick
  name: httpbin-sick
  namespace: default
  workloadIps: ["10.0.2.4"]
  status: Unhealthy
  services:
    "default/httpbin.default.svc.cluster.local": {8000: 80}
- uid: c1//v1/Pod/default/waypoint
  name: waypoint
  namespace: default
  workloadIps: ["10.0.3.2"]
  protocol: HBONE
  services:
    "default/waypoint.default.svc.cluster.local": {15008: 15008}
- uid: c1//v1/Pod/other/client
  name: client
  namespace: other
  workloadIps: ["10.0.4.2"]
  waypoint: {destination: "/10.0.3.2"}
  services: {}
services:
- name: httpbin
  namespace: default
  hostname: httpbin.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {8000: 80, 9000: 0}
  endpoints:
    c1//v1/Pod/default/httpbin-alt:
      workloadUid: c1//v1/Pod/default/httpbin-alt
      port: {8000: 8080, 9000: 9090}
      status: Healthy
  waypoint: {destination: "/10.0.3.2", hboneMtlsPort: 15008}
- name: waypoint
  namespace: default
  hostname: waypoint.default.svc.cluster.local
  vips: ["/10.96.0.20"]
  ports: {15008: 15008}
policies:
- name: deny-all-9999
  namespace: istio-system
  scope: Global
  action: Deny
  rules: [[[{destinationPorts: [9999]}]]]
- name: allow-default
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{namespaces: [!Exact default]}]]]
- name: other-ns
  namespace: other
  scope: Namespace
  action: Allow
  rules: [[[{principals: [!Presence []]}]]]
- name: sleep-only
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Prefix "cluster.local/ns/default/sa/"]
        notPrincipals: [!Suffix /sa/evil]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(CLUSTER_YAML)
    return path


@pytest.fixture
def config(config_file: Path) -> LocalConfig:
    return LocalConfig.load(config_file)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=SerdeYamlLoader)


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=SerdeYamlDumper)


def _write_invalid(path: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("workloads: [{name: x}]\n")
    os.replace(tmp_path / "bad.yaml", path)


def test_workload_fields(config: LocalConfig) -> None:
    httpbin = config.workload_by_ip("10.0.2.2")
    assert httpbin is not None
    assert (httpbin.name, httpbin.protocol, httpbin.node) == ("httpbin", "HBONE", "node-b")
    assert httpbin.identity == Identity("cluster.local", "default", "httpbin")
    assert config.workload_by_ip("10.0.9.9") is None
    assert config.workload_by_uid("c1//v1/Pod/default/sleep") == config.workload_by_ip("10.0.1.2")


def test_identity_defaults_for_omitted_trust_domain_and_account(config: LocalConfig) -> None:
    alt = config.workload_by_ip("10.0.2.3")
    assert alt is not None
    assert alt.identity.uri == "spiffe://cluster.local/ns/default/sa/default"


def test_service_by_vip_needs_a_known_port(config: LocalConfig) -> None:
    service = config.service_by_vip("10.96.0.10", 8000)
    assert service is not None and service.name == "httpbin"
    assert service.vips == [NetworkAddress("", service.vips[0].address)]
    assert config.service_by_vip("10.96.0.10", 8001) is None
    assert config.service_by_vip("10.96.0.99", 8000) is None


def test_endpoints_use_endpoint_then_service_target_port(config: LocalConfig) -> None:
    service = config.service_by_host("default/httpbin.default.svc.cluster.local")
    assert service is not None
    by_name = {w.name: port for w, port in config.endpoints(service, 8000)}
    # httpbin-sick is Unhealthy and left out.
    assert by_name == {"httpbin": 80, "httpbin-alt": 8080}
    # Service target port 0: only endpoints that map the port themselves.
    assert [(w.name, p) for w, p in config.endpoints(service, 9000)] == [("httpbin-alt", 9090)]
    assert config.endpoints(service, 1234) == []


def test_policies_for_selects_namespace_global_and_listed(config: LocalConfig) -> None:
    sleep = config.workload_by_ip("10.0.1.2")
    httpbin = config.workload_by_ip("10.0.2.2")
    client = config.workload_by_ip("10.0.4.2")
    assert sleep and httpbin and client
    keys = [p.key for p in config.policies_for(sleep)]
    assert keys == ["default/allow-default", "istio-system/deny-all-9999", "default/sleep-only"]
    assert [p.key for p in config.policies_for(httpbin)] == keys[:2]
    assert [p.key for p in config.policies_for(client)] == [
        "other/other-ns",
        "istio-system/deny-all-9999",
    ]


def test_waypoint_lookups(config: LocalConfig) -> None:
    httpbin = config.workload_by_ip("10.0.2.2")
    client = config.workload_by_ip("10.0.4.2")
    service = config.service_by_vip("10.96.0.10", 8000)
    assert httpbin and client and service
    # By hostname: the waypoint service's VIP.
    assert config.waypoint_for_workload(httpbin) == ("10.96.0.20", 15008)
    # By address; hboneMtlsPort defaults to 15008.
    assert config.waypoint_for_workload(client) == ("10.0.3.2", 15008)
    assert config.waypoint_for_service(service) == ("10.0.3.2", 15008)
    sleep = config.workload_by_ip("10.0.1.2")
    assert sleep is not None and config.waypoint_for_workload(sleep) is None


def test_string_match_forms() -> None:
    def parse(raw: object) -> StringMatch:
        return StringMatch.model_validate(raw)

    assert parse({"Exact": "a"}) == StringMatch(kind="Exact", value="a")
    assert parse({"Presence": []}) == StringMatch(kind="Presence")
    assert parse("*") == StringMatch(kind="Presence")
    assert parse("ns/*") == StringMatch(kind="Prefix", value="ns/")
    assert parse("*/sa/x") == StringMatch(kind="Suffix", value="/sa/x")
    assert parse("exact") == StringMatch(kind="Exact", value="exact")
    assert parse("*").model_dump() == {"Presence": []}


def test_dump_yaml_round_trips_in_ztunnel_shape(config: LocalConfig) -> None:
    dumped = config.dump_yaml()
    data = _load(dumped)
    assert LocalConfig.from_yaml(dumped) == config
    httpbin = data["workloads"][1]
    assert httpbin["services"] == {"default/httpbin.default.svc.cluster.local": {8000: 80}}
    assert httpbin["serviceAccount"] == "httpbin"
    assert "networkMode" not in httpbin  # defaults are left out...
    assert data["policies"][0]["dryRun"] is False  # ...except those ztunnel requires
    (((sleep_only,),),) = data["policies"][3]["rules"]
    assert sleep_only["notPrincipals"] == [SerdeTag("Suffix", "/sa/evil")]
    assert data["policies"][2]["rules"] == [[[{"principals": [SerdeTag("Presence")]}]]]
    assert data["services"][0]["vips"] == ["/10.96.0.10"]


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    # serde_json's form: string matches as maps, {"Exact": s}.
    config = LocalConfig.from_yaml(CLUSTER_YAML)
    data = config.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    assert data["policies"][1]["rules"] == [[[{"namespaces": [{"Exact": "default"}]}]]]
    path.write_text(json.dumps(data))
    config = LocalConfig.load(path)
    service = config.service_by_vip("10.96.0.10", 8000)
    assert service is not None and service.ports == {8000: 80, 9000: 0}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["workloads"][0].update(workloadIps=["10.0.1.300"]),
            r"workloads\[0\]\.workloadIps\[0\]: .*'10.0.1.300'",
        ),
        (
            lambda d: d["workloads"][1].update(protocol="HTTP"),
            r"workloads\[1\]\.protocol: Input should be 'TCP' or 'HBONE'",
        ),
        (
            lambda d: d["workloads"][0].update(serviceAcount="x"),
            r"workloads\[0\]\.serviceAcount: Extra inputs are not permitted",
        ),
        (
            lambda d: d["services"][0].update(vips=["10.96.0.10"]),
            r"services\[0\]\.vips\[0\]: .*'<network>/<ip>'",
        ),
        (
            lambda d: d["services"][0].update(ports={"http": 80}),
            r"services\[0\]\.ports\.http\[key\]: .*valid integer.*\(got 'http'\)",
        ),
        (
            lambda d: d["policies"][0]["rules"][0][0][0].update(sourceIps=["nonsense"]),
            r"policies\[0\]\.rules\[0\]\[0\]\[0\]\.sourceIps\[0\]",
        ),
        (
            lambda d: d["workloads"][0].update(services={"default/nope": {80: 80}}),
            r"workloads\[0\]\.services: no service 'default/nope'",
        ),
        (
            lambda d: d["workloads"][1].update(workloadIps=["10.0.1.2"]),
            r"workloads\[1\]\.workloadIps: duplicate '10.0.1.2'",
        ),
        (
            lambda d: d["workloads"][0].update(authorizationPolicies=["default/nope"]),
            r"unknown policy 'default/nope'",
        ),
    ],
)
def test_load_errors_name_file_and_field(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = _load(CLUSTER_YAML)
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(_dump(data))
    with pytest.raises(ConfigError, match=f"^{path}: .*{message}"):
        LocalConfig.load(path)


def test_load_unreadable_or_unparsable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        LocalConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("workloads: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid yaml"):
        LocalConfig.load(tmp_path / "bad.yaml")


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert LocalConfig.load(tmp_path / "empty.yaml") == LocalConfig()


def _new_version(path: Path, tmp_path: Path, node: str) -> None:
    data = _load(CLUSTER_YAML)
    data["workloads"][0]["node"] = node
    (tmp_path / "next.yaml").write_text(_dump(data))
    os.replace(tmp_path / "next.yaml", path)  # atomic, as a writer should replace it


def test_config_watcher_thread_reloads_and_keeps_old_on_error(
    config_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[LocalConfig] = []
    changed = threading.Event()

    def on_change(config: LocalConfig) -> None:
        seen.append(config)
        changed.set()

    watcher = ConfigWatcher(config_file, on_change, interval=0.02).start()
    try:
        _write_invalid(config_file, tmp_path)
        time.sleep(0.2)
        assert seen == []
        assert "keeping the previous mesh config" in caplog.text
        _new_version(config_file, tmp_path, "node-z")
        assert changed.wait(5)
    finally:
        watcher.stop()
    sleep = seen[0].workload_by_ip("10.0.1.2")
    assert sleep is not None and sleep.node == "node-z"


POLICY_YAML = """
policies:
- name: p
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules: [[[{principals: [MATCH]}]]]
"""


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ("!Exact cluster.local/ns/a", StringMatch(kind="Exact", value="cluster.local/ns/a")),
        ("!Prefix 'a: b'", StringMatch(kind="Prefix", value="a: b")),
        ("!Suffix '123'", StringMatch(kind="Suffix", value="123")),
        ("!Presence []", StringMatch(kind="Presence")),
        ("!Presence ", StringMatch(kind="Presence")),  # serde_yaml reads an empty value too
    ],
)
def test_yaml_string_matches_are_serde_yaml_tags(match: str, expected: StringMatch) -> None:
    config = LocalConfig.from_yaml(POLICY_YAML.replace("MATCH", match))
    assert config.policies[0].rules[0][0][0].principals == [expected]


@pytest.mark.parametrize(
    ("match", "message"),
    [
        # What serde_yaml rejects (and with it the whole file) is rejected here as well.
        ("{Exact: x}", r"principals\[0\]: expected a string match in serde_yaml's tagged form"),
        ("'*'", r"principals\[0\]: expected a string match in serde_yaml's tagged form"),
        ("!Presence x", r"not valid yaml: !Presence takes no value(.|\n)*line 8"),
        ("!Exact [x]", r"not valid yaml: !Exact takes a string"),
        ("!Regex x", r"not valid yaml: could not determine a constructor for the tag '!Regex'"),
    ],
)
def test_yaml_string_match_in_another_form_is_an_error(match: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^f.yaml: (policies.0..rules.0..0..0..)?{message}"):
        LocalConfig.from_yaml(POLICY_YAML.replace("MATCH", match), "f.yaml")


def test_dump_writes_tags_as_serde_yaml_does() -> None:
    matches = [
        StringMatch(kind="Exact", value="default"),
        StringMatch(kind="Prefix", value="true"),  # untagged it would read as a bool: quoted
        StringMatch(kind="Presence"),
    ]
    policy: dict[str, object] = {"name": "p", "namespace": "d", "scope": "Global", "action": "Deny"}
    policy["rules"] = [[[{"namespaces": matches}]]]
    text = LocalConfig.model_validate({"policies": [policy]}).dump_yaml()
    assert "- !Exact default\n" in text
    assert "- !Prefix 'true'\n" in text
    assert "- !Presence []\n" in text


SERVICE_FIELDS_YAML = """
services:
- name: s
  namespace: default
  hostname: s.default.svc.cluster.local
  vips: [/10.96.0.30]
  cidrVips: [{network: "", cidr: 10.96.128.0/24}]
  ports: {80: 8080}
  weightedWaypoints:
  - {destination: {destination: /10.0.3.2, hboneMtlsPort: 15008}, weight: 90}
  - {destination: {destination: default/wp2.default.svc.cluster.local, hboneMtlsPort: 15008},
     weight: 10}
  loadBalancer: {routingPreferences: [Zone, Node], mode: Failover, healthPolicy: AllowAll}
"""


def test_service_fields_of_istios_ztunnel_are_accepted_and_kept() -> None:
    config = LocalConfig.from_yaml(SERVICE_FIELDS_YAML)
    (service,) = config.services
    assert [(str(c.cidr), c.network) for c in service.cidr_vips] == [("10.96.128.0/24", "")]
    assert [w.weight for w in service.weighted_waypoints] == [90, 10]
    assert service.weighted_waypoints[1].destination.destination == (
        "default/wp2.default.svc.cluster.local"
    )
    assert service.load_balancer is not None
    assert (service.load_balancer.mode, service.load_balancer.routing_preferences) == (
        "Failover", ["Zone", "Node"],
    )  # fmt: skip
    assert LocalConfig.from_yaml(config.dump_yaml()) == config


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("healthPolicy: AllowAll", "", r"loadBalancer\.healthPolicy: Field required"),
        ("mode: Failover", "mode: Random", r"loadBalancer\.mode: Input should be 'Standard'"),
        ("weight: 90", "weight: -1", r"weightedWaypoints\[0\]\.weight: Input should be greater"),
        ('network: ""', "net: x", r"cidrVips\[0\]\.network: Field required"),
    ],
)
def test_service_field_errors_name_the_field(old: str, new: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^s.yaml: services\\[0\\]\\.{message}"):
        LocalConfig.from_yaml(SERVICE_FIELDS_YAML.replace(old, new), "s.yaml")


def test_a_partial_locality_is_written_whole() -> None:
    # ztunnel's Locality has no serde defaults: region, zone and subzone must all be there.
    workload = {"workloadIps": ["10.0.0.1"], "namespace": "d", "locality": {"zone": "z1"}}
    data = _load(LocalConfig.model_validate({"workloads": [workload]}).dump_yaml())
    assert data["workloads"][0]["locality"] == {"region": "", "zone": "z1", "subzone": ""}
