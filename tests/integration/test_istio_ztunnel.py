"""Istio's own ztunnel (the Rust binary from istio/ztunnel) against the testbed's files and CA.

Runs only with a binary: TESTBED_ZTUNNEL=/path/to/ztunnel (build it with upstream's own
instructions). Each test starts, in a namespace of its own with only loopback, the testbed's
CA service and Istio's ztunnel with the environment it needs for local config
(LOCAL_XDS_PATH, NODE_NAME, XDS_ADDRESS empty) and for certificates (CA_ADDRESS, CA_ROOT_CA,
AUTH_TOKEN), then reads ztunnel's admin /config_dump on 15000. Also checked: the map form of
string matches the testbed wrote before makes it refuse the file, and a node's token gets no
certificate for pods of another node.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from ztunnel_configs import with_policies

from testbed.cluster.loader import available
from testbed.mesh.ca import CertificateAuthority
from testbed.mesh.ca_service import CaServicePlan
from testbed.mesh.config import LocalConfig
from testbed.netlab import Lab, ManagedProcess, Netns
from testbed.redirect.control import mesh_config

BINARY = os.environ.get("TESTBED_ZTUNNEL", "")
pytestmark = pytest.mark.skipif(
    not (BINARY and os.access(BINARY, os.X_OK)),
    reason="no Istio ztunnel binary: set TESTBED_ZTUNNEL to an executable built from istio/ztunnel",
)
ADMIN_PORT = 15000
NODE = "node1"
START_TIMEOUT = 60.0  # a debug build on a loaded machine starts slowly


def ztunnel_version() -> str:
    done = subprocess.run([BINARY, "version"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def admin_get(netns: Netns, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=5)
    with netns.entered():
        connection.connect()
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Running:
    netns: Netns
    ztunnel: ManagedProcess
    ca_process: ManagedProcess
    plan: CaServicePlan
    ca: CertificateAuthority

    def config_dump(self, until: Any = None, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The admin config dump, polled until `until(dump)` holds (or just until it answers)."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.ztunnel.poll() is None, f"ztunnel exited: {self.ztunnel.output()[-3000:]}"
            try:
                status, body = admin_get(self.netns, "/config_dump")
                if status == 200:
                    last = json.loads(body)
                    if until is None or until(last):
                        return last
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"no such config dump in {timeout} s; last: {str(last)[:2000]}")


@pytest.fixture
def lab(runs_root: Path) -> Iterator[Lab]:
    lab = Lab.create(f"ica-{uuid.uuid4().hex[:6]}", runs_root)
    try:
        yield lab
    finally:
        lab.teardown()


def start(
    lab: Lab, config_text: str, token_of: str = NODE, ztunnel_text: str | None = None
) -> Running:
    """The CA service reading `config_text`, Istio's ztunnel reading it or `ztunnel_text`."""
    netns = lab.add_netns("zt")
    netns.run(["ip", "link", "set", "lo", "up"])
    mesh = lab.add_file(lab.workdir / "mesh-config.yaml")
    mesh.write_text(config_text)
    ca = CertificateAuthority.create()
    folder = lab.add_dir(lab.workdir / "ca")
    plan = CaServicePlan.prepare(folder, ca, mesh, [NODE, "node2"], "127.0.0.1")
    ca_process = netns.spawn(plan.argv(), label="ca")
    plan.await_ready(netns, ca_process)
    local = mesh
    if ztunnel_text is not None:
        local = lab.add_file(lab.workdir / "ztunnel-config.yaml")
        local.write_text(ztunnel_text)
    env = {
        "LOCAL_XDS_PATH": str(local),
        "XDS_ADDRESS": "",  # no istiod: the local file is the whole config
        "NODE_NAME": NODE,
        # No CNI agent listens there: ztunnel keeps retrying, which does not stop it serving.
        "INPOD_UDS": str(lab.workdir / "no-agent.sock"),
        "RUST_LOG": "info",
        **plan.ztunnel_env(NODE),
        "AUTH_TOKEN": str(plan.token_files[token_of]),
    }
    ztunnel = netns.spawn([BINARY], label="istio-ztunnel", env=env)
    return Running(netns, ztunnel, ca_process, plan, ca)


@pytest.mark.parametrize("name", sorted(available()))
def test_istios_ztunnel_loads_the_generated_config(lab: Lab, name: str) -> None:
    topology = with_policies(name)
    config = mesh_config(topology)
    running = start(lab, config.dump_yaml())
    dump = running.config_dump()
    assert {w["uid"] for w in dump["workloads"]} == {w.uid for w in config.workloads}
    assert {s["hostname"] for s in dump["services"]} == {s.hostname for s in config.services}
    assert {p["name"] for p in dump["policies"]} == {p.name for p in config.policies}
    allow = next(p for p in dump["policies"] if p["name"] == "allow-kinds")
    # serde_json writes what it read from our tags in its map form.
    (((first,),), *_) = allow["rules"]
    assert first["notPrincipals"] == [{"Suffix": "/sa/evil"}, {"Presence": []}]
    assert first["namespaces"] == [{"Exact": "default"}, {"Prefix": "team-"}]
    print(f"{name}: loaded by {ztunnel_version()}")


def test_istios_ztunnel_gets_its_workload_certificates_from_our_ca(lab: Lab) -> None:
    topology = with_policies("two_nodes")
    running = start(lab, mesh_config(topology).dump_yaml())
    local = sorted(
        {f"spiffe://cluster.local/ns/{p.namespace}/sa/{p.service_account}"
         for p in topology.pods.values() if p.node == NODE}
    )  # fmt: skip

    def all_available(dump: dict[str, Any]) -> bool:
        states = {c["identity"]: c["state"] for c in dump.get("certificates", [])}
        return all(states.get(identity) == "Available" for identity in local)

    dump = running.config_dump(until=all_available)
    store = Store([x509.load_pem_x509_certificate(running.ca.root_pem)])
    for certs in dump["certificates"]:
        if certs["identity"] not in local:
            continue
        # The dump's "pem" is base64 of the PEM text.
        pems = [base64.b64decode(c["pem"]) for c in certs["certChain"]]
        chain = [x509.load_pem_x509_certificate(pem) for pem in pems]
        verified = PolicyBuilder().store(store).build_client_verifier().verify(chain[0], chain[1:])
        uris = [s for s in verified.subjects or [] if isinstance(s, x509.UniformResourceIdentifier)]
        assert [u.value for u in uris] == [certs["identity"]]
    log = running.ca_process.output()
    assert all(f"issued {identity} for node {NODE}" in log for identity in local)
    print(f"certificates {local} issued to {ztunnel_version()}")


def test_istios_ztunnel_rejects_string_matches_written_as_maps(lab: Lab) -> None:
    # What the testbed wrote before: the whole file is refused, so this is what the tags fix.
    text = mesh_config(with_policies("two_nodes")).dump_yaml()
    old = text.replace("- !Exact default\n", "- {Exact: default}\n")
    assert old != text
    running = start(lab, text, ztunnel_text=old)
    assert running.ztunnel.wait(START_TIMEOUT) != 0
    assert "namespaces[0]: invalid type: map, expected a YAML tag" in running.ztunnel.output()


def test_a_token_gets_no_certificate_for_another_nodes_pods(lab: Lab) -> None:
    # ztunnel of node1 holding node2's token: the CA refuses node1's identities.
    topology = with_policies("two_nodes")
    running = start(lab, mesh_config(topology).dump_yaml(), token_of="node2")
    client = "spiffe://cluster.local/ns/default/sa/client"  # only on node1

    def refused(dump: dict[str, Any]) -> bool:
        states: dict[str, str] = {c["identity"]: c["state"] for c in dump.get("certificates", [])}
        return states.get(client, "").startswith("Unavailable")

    dump = running.config_dump(until=refused)
    (state,) = [c["state"] for c in dump["certificates"] if c["identity"] == client]
    assert "PermissionDenied" in state or "may not act for" in state
    assert f"node node2's ztunnel may not act for {client}" in running.ca_process.output()


def test_istios_ztunnel_loads_the_service_and_workload_fields_we_accept(lab: Lab) -> None:
    data = mesh_config(with_policies("two_nodes")).model_dump(by_alias=True, exclude_defaults=True)
    (service,) = data["services"]
    service["cidrVips"] = [{"network": "", "cidr": "10.96.128.0/24"}]
    waypoint = {"destination": "/10.244.1.9", "hboneMtlsPort": 15008}
    service["weightedWaypoints"] = [{"destination": waypoint, "weight": 100}]
    service["loadBalancer"] = {
        "routingPreferences": ["Zone", "Node"], "mode": "Failover", "healthPolicy": "AllowAll",
    }  # fmt: skip
    data["workloads"][0]["locality"] = {"zone": "z1"}  # written whole: region, zone, subzone
    config = LocalConfig.model_validate(data)
    dump = start(lab, config.dump_yaml()).config_dump()
    (dumped,) = [s for s in dump["services"] if s["hostname"] == service["hostname"]]
    assert dumped["loadBalancer"]["mode"] == "Failover"
    assert [w["weight"] for w in dumped["weightedWaypoints"]] == [100]
    assert dumped["cidrVips"] == [{"network": "", "cidr": "10.96.128.0/24"}]
    client = next(w for w in dump["workloads"] if w["uid"] == data["workloads"][0]["uid"])
    assert client["locality"]["zone"] == "z1"
