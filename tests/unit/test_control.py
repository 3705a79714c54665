"""The control plane: topology -> ztunnel local config (workloads, services, policies) and
per-node certificates; checked through the config's own lookups and the authz engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from testbed.cluster import Topology, plan
from testbed.mesh.authz import CompiledPolicies, ConnectionFacts
from testbed.mesh.ca import Identity, identity_from_peer_cert
from testbed.mesh.config import LocalConfig
from testbed.redirect.control import ControlPlane, is_captured, mesh_config

TD = "cluster.local"


class Small(Topology):
    name = "small"

    def build(self) -> None:
        self.add_node("n1")
        self.add_node("n2")
        self.add_pod("client", "n1", labels={"app": "client", "version": "v3"})
        self.add_pod("api1", "n1", service_account="api", labels={"app": "api"})
        self.add_pod("api2", "n2", service_account="api", labels={"app": "api"})
        self.add_pod("legacy", "n2", labels={"istio.io/dataplane-mode": "none"})
        self.add_pod("batch", "n2", namespace="jobs", labels={"app": "batch"})
        self.add_service("api", selector={"app": "api"}, ports={80: 8080})


@pytest.fixture
def topology() -> Topology:
    return plan(Small())


def ident(namespace: str, sa: str) -> Identity:
    return Identity(TD, namespace, sa)


def decide(config: LocalConfig, dest: str, src: Identity | None, port: int = 8080) -> bool:
    workload = config.workload_by_uid(dest)
    assert workload is not None
    facts = ConnectionFacts(src, "10.244.1.2", str(workload.workload_ips[0]), port)
    return CompiledPolicies.from_config(config).evaluate(workload, facts).allowed


def test_workloads_carry_identity_protocol_and_services(topology: Topology) -> None:
    config = mesh_config(topology)
    client = config.workload_by_ip(topology.pods["client"].ip)
    assert client is not None and client.uid == "default-client"
    assert client.identity == ident("default", "client")
    assert (client.protocol, client.canonical_name, client.canonical_revision) == (
        "HBONE", "client", "v3",
    )  # fmt: skip
    legacy = config.workload_by_uid("default-legacy")
    assert legacy is not None and legacy.protocol == "TCP"
    assert not is_captured(topology.pods["legacy"])


def test_unenrolled_pods_are_plain_tcp(topology: Topology) -> None:
    config = mesh_config(topology, unenrolled={"api1"})
    protocols = {w.name: w.protocol for w in config.workloads}
    assert protocols == {"client": "HBONE", "api1": "TCP", "api2": "HBONE", "legacy": "TCP",
                         "batch": "HBONE"}  # fmt: skip


def test_service_vip_resolves_to_its_endpoints(topology: Topology) -> None:
    config = mesh_config(topology)
    vip = topology.services["api"].vip
    service = config.service_by_vip(vip, 80)
    assert service is not None and service.hostname == "api.default.svc.cluster.local"
    endpoints = {(w.name, port) for w, port in config.endpoints(service, 80)}
    assert endpoints == {("api1", 8080), ("api2", 8080)}
    assert service.subject_alt_names == [ident("default", "api").uri]


def test_config_survives_a_yaml_round_trip(topology: Topology) -> None:
    topology.add_policy("p", action="DENY", rules=[{"ports": [1], "not_namespaces": ["x*"]}])
    text = mesh_config(topology).dump_yaml()
    assert LocalConfig.from_yaml(text).dump_yaml() == text


def test_no_policies_allow_everything(topology: Topology) -> None:
    assert decide(mesh_config(topology), "default-api1", ident("jobs", "batch"))


def test_selector_policy_applies_to_selected_pods_only(topology: Topology) -> None:
    topology.add_policy(
        "deny-client", action="DENY", selector={"app": "api"},
        rules=[{"principals": ["cluster.local/ns/default/sa/client"]}],
    )  # fmt: skip
    config = mesh_config(topology)
    assert not decide(config, "default-api2", ident("default", "client"))
    assert decide(config, "default-api2", ident("jobs", "batch"))
    assert decide(config, "jobs-batch", ident("default", "client"))


def test_namespace_and_root_scopes(topology: Topology) -> None:
    topology.add_policy("jobs-only", action="ALLOW", namespace="jobs",
                        rules=[{"namespaces": ["jobs"]}])  # fmt: skip
    topology.add_policy("no-9090", action="DENY", namespace="istio-system",
                        rules=[{"ports": [9090]}])  # fmt: skip
    config = mesh_config(topology)
    scopes = {p.name: p.scope for p in config.policies}
    assert scopes == {"jobs-only": "Namespace", "no-9090": "Global"}
    assert not decide(config, "jobs-batch", ident("default", "client"))
    assert decide(config, "jobs-batch", ident("jobs", "other"))
    assert decide(config, "default-api1", ident("default", "client"))
    assert not decide(config, "default-api1", ident("default", "client"), port=9090)


def test_empty_rule_matches_all_and_no_rules_match_none(topology: Topology) -> None:
    topology.add_policy("deny-all", action="DENY", selector={"app": "api"}, rules=[{}])
    topology.add_policy(
        "allow-nothing", action="ALLOW", namespace="jobs", selector={"app": "batch"}, rules=[]
    )
    config = mesh_config(topology)
    assert not decide(config, "default-api1", ident("jobs", "batch"))
    assert not decide(config, "jobs-batch", ident("default", "client"))
    assert decide(config, "default-client", ident("default", "api"))


def test_negations_and_ip_blocks(topology: Topology) -> None:
    topology.add_policy(
        "outsiders", action="DENY", selector={"app": "api"},
        rules=[{"not_namespaces": ["default"], "not_ip_blocks": ["10.244.2.0/24"]}],
    )  # fmt: skip
    config = mesh_config(topology)
    assert not decide(config, "default-api1", ident("jobs", "batch"))  # from 10.244.1.2
    assert decide(config, "default-api1", ident("default", "client"))
    assert not decide(config, "default-api1", None)  # plaintext: no namespace


def test_control_plane_writes_config_and_node_certs(topology: Topology, tmp_path: Path) -> None:
    control = ControlPlane(tmp_path / "mesh", trust_domain="example.org")
    control.write_config(topology)
    loaded = LocalConfig.load(control.config_path)
    assert loaded.workload_by_uid("default-api1") is not None
    assert {w.trust_domain for w in loaded.workloads} == {"example.org"}
    folders = control.issue_node_certs(topology, "n2", tmp_path / "n2")
    # api2 and batch are captured on n2; legacy is not in the mesh
    names = [f.relative_to(tmp_path / "n2").as_posix() for f in folders]
    assert names == ["default/api", "jobs/batch"]
    cert = x509.load_pem_x509_certificate((folders[0] / "cert-chain.pem").read_bytes())
    der = cert.public_bytes(Encoding.DER)
    assert identity_from_peer_cert(der) == Identity("example.org", "default", "api")
    assert (folders[0] / "key.pem").stat().st_mode & 0o077 == 0
