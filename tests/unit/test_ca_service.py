"""The CA service over real gRPC and TLS: Istio's CreateCertificate from a Python client.

The client side here is written from Istio's protocol, not from the service: its own CSRs
(cryptography), the method path, the bearer token and the ImpersonatedIdentity metadata that
Istio's ztunnel sends, and chain verification with cryptography's X.509 path validation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from google.protobuf import struct_pb2

from testbed.mesh import ca_proto
from testbed.mesh.ca import CertificateAuthority, Identity
from testbed.mesh.ca_service import (
    ISTIOD_NAME,
    CaServicePlan,
    CertificateService,
    RunningServer,
    load_tokens,
    serve,
)
from testbed.mesh.config import ConfigError, LocalConfig

TD = "cluster.local"
TOKENS = {"node1": "token-of-node1", "node2": "token-of-node2"}
MESH = {
    "workloads": [
        {"uid": "c", "name": "client", "namespace": "default", "serviceAccount": "client",
         "workloadIps": ["10.244.1.2"], "node": "node1", "protocol": "HBONE"},
        {"uid": "s", "name": "server", "namespace": "default", "serviceAccount": "server",
         "workloadIps": ["10.244.2.2"], "node": "node2", "protocol": "HBONE"},
    ]
}  # fmt: skip
CLIENT = Identity(TD, "default", "client")
SERVER = Identity(TD, "default", "server")


def make_csr(*uris: str, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, Any]:
    """A PEM CSR with these URI SANs, as Istio's ztunnel builds one (P-256, empty subject)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
def server(ca: CertificateAuthority) -> Iterator[RunningServer]:
    tokens = {token: node for node, token in TOKENS.items()}
    service = CertificateService(ca, tokens, LocalConfig.model_validate(MESH))
    running = serve(service, "127.0.0.1", 0)
    yield running
    running.stop(0)


@contextmanager
def channel(ca: CertificateAuthority, port: int, name: str | None = None) -> Iterator[Any]:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.root_pem)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as ch:
        yield ch


def create_certificate(
    ch: Any,
    csr: str,
    token: str | None = TOKENS["node1"],
    impersonate: str | None = None,
    ttl: int = 3600,
) -> list[str]:
    call = ch.unary_unary(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=ca_proto.IstioCertificateResponse.FromString,
    )
    metadata = struct_pb2.Struct()
    if impersonate is not None:
        metadata.fields["ImpersonatedIdentity"].string_value = impersonate
    request = ca_proto.IstioCertificateRequest(csr=csr, validity_duration=ttl, metadata=metadata)
    headers = [("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes")] if token else []
    response = call(request, metadata=headers, timeout=10)
    return list(response.cert_chain)


def verified_identity(chain: list[str], root_pem: bytes) -> str:
    """The leaf's URI SAN after X.509 path validation against the root alone."""
    leaf, *rest = [x509.load_pem_x509_certificate(c.encode()) for c in chain]
    store = Store([x509.load_pem_x509_certificate(root_pem)])
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(leaf, rest)
    (uri,) = [
        s.value for s in verified.subjects or [] if isinstance(s, x509.UniformResourceIdentifier)
    ]
    return uri


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_messages_have_istios_field_numbers() -> None:
    # csr = 1 (string), validity_duration = 3 (int64), metadata = 4 (Struct); cert_chain = 1.
    request = ca_proto.IstioCertificateRequest(csr="x", validity_duration=300)
    request.metadata.fields["k"].string_value = "v"
    struct = b"\x0a\x08\x0a\x01k\x12\x03\x1a\x01v"  # fields{key: "k", value{string_value: "v"}}
    assert (
        request.SerializeToString() == b"\x0a\x01x\x18\xac\x02\x22" + bytes([len(struct)]) + struct
    )
    response = ca_proto.IstioCertificateResponse.FromString(b"\x0a\x01a\x0a\x01b")
    assert list(response.cert_chain) == ["a", "b"]
    assert ca_proto.METHOD_PATH == "/istio.v1.auth.IstioCertificateService/CreateCertificate"


def test_csr_gets_a_chain_that_verifies_against_the_root(
    ca: CertificateAuthority, server: RunningServer
) -> None:
    csr, key = make_csr(CLIENT.uri)
    with channel(ca, server.port) as ch:
        chain = create_certificate(ch, csr, impersonate=CLIENT.uri)
    assert len(chain) == 2 and chain[-1].encode() == ca.root_pem  # leaf first, root last
    assert verified_identity(chain, ca.root_pem) == CLIENT.uri
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.public_key() == key.public_key()  # the CSR's key, not one of the CA's
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 3600 <= lifetime.total_seconds() <= 3600 + 120  # as asked, plus the clock slack


def test_server_certificate_names_istiod(ca: CertificateAuthority, server: RunningServer) -> None:
    # Istio's ztunnel checks the CA's certificate for the host of CA_ADDRESS.
    csr, _ = make_csr(CLIENT.uri)
    with channel(ca, server.port, name=ISTIOD_NAME) as ch:
        assert create_certificate(ch, csr)
    with channel(ca, server.port, name="evil.example") as ch:
        code, _ = status_of(lambda: create_certificate(ch, csr))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_identity_the_node_may_not_act_for_is_denied(
    ca: CertificateAuthority, server: RunningServer
) -> None:
    csr, _ = make_csr(SERVER.uri)  # server runs on node2 only
    with channel(ca, server.port) as ch:
        code, details = status_of(lambda: create_certificate(ch, csr, impersonate=SERVER.uri))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "node node1" in details and SERVER.uri in details
        # The node that runs it gets it.
        chain = create_certificate(ch, csr, token=TOKENS["node2"], impersonate=SERVER.uri)
        assert verified_identity(chain, ca.root_pem) == SERVER.uri
        foreign, _ = make_csr("spiffe://other.domain/ns/default/sa/client")
        code, details = status_of(lambda: create_certificate(ch, foreign))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "trust domain" in details


def test_impersonated_identity_must_match_the_csr(
    ca: CertificateAuthority, server: RunningServer
) -> None:
    csr, _ = make_csr(CLIENT.uri)
    with channel(ca, server.port) as ch:
        code, details = status_of(lambda: create_certificate(ch, csr, impersonate=SERVER.uri))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ImpersonatedIdentity" in details


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_without_a_known_token_unauthenticated(
    ca: CertificateAuthority, server: RunningServer, token: str | None
) -> None:
    csr, _ = make_csr(CLIENT.uri)
    with channel(ca, server.port) as ch:
        code, _ = status_of(lambda: create_certificate(ch, csr, token=token))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def _tampered_csr() -> str:
    csr, _ = make_csr(CLIENT.uri)
    der = bytearray(x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("csr", "detail"),
    [
        ("garbage", "not a PEM certificate signing request"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "PEM"),
        (None, "signature does not verify"),
        (make_csr()[0], "0 URI SANs"),
        (make_csr(CLIENT.uri, SERVER.uri)[0], "2 URI SANs"),
        (make_csr("https://example.com/x")[0], "not a SPIFFE identity"),
    ],
)
def test_malformed_csr_is_an_error_and_the_service_keeps_serving(
    ca: CertificateAuthority, server: RunningServer, csr: str | None, detail: str
) -> None:
    bad = csr if csr is not None else _tampered_csr()
    good, _ = make_csr(CLIENT.uri)
    with channel(ca, server.port) as ch:
        code, details = status_of(lambda: create_certificate(ch, bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and detail in details
        assert verified_identity(create_certificate(ch, good), ca.root_pem) == CLIENT.uri


def test_a_ttl_beyond_istios_maximum_is_refused(
    ca: CertificateAuthority, server: RunningServer
) -> None:
    csr, _ = make_csr(CLIENT.uri)
    with channel(ca, server.port) as ch:
        code, details = status_of(lambda: create_certificate(ch, csr, ttl=91 * 24 * 3600))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "maximum" in details


def test_tokens_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"nodes": {"node1": ""}}))
    with pytest.raises(ConfigError, match=r"tokens\.json: expected JSON"):
        load_tokens(path)
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read"):
        load_tokens(tmp_path / "missing.json")


def test_plan_writes_private_tokens_and_the_ztunnel_environment(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    mesh = tmp_path / "mesh-config.yaml"
    plan = CaServicePlan.prepare(tmp_path / "ca", ca, mesh, ["node1", "node2"], "10.244.1.9")
    env = plan.ztunnel_env("node2")
    assert env["CA_ADDRESS"] == "https://10.244.1.9:15012"
    assert Path(env["CA_ROOT_CA"]).read_bytes() == ca.root_pem
    token = Path(env["AUTH_TOKEN"]).read_text()
    assert load_tokens(tmp_path / "ca" / "tokens.json")[token] == "node2"
    for path in [*plan.token_files.values(), tmp_path / "ca" / "tokens.json"]:
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert plan.token_files["node1"].read_text() != token
    assert plan.argv()[1:3] == ["-m", "testbed.mesh.ca_service"]


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving istio.v1.auth.IstioCertificateService on" in line:
            return proc, int(line.rsplit(":", 1)[1])
    proc.wait(5)
    raise AssertionError(f"the CA service did not start (exit {proc.returncode})")


def test_command_serves_follows_the_mesh_config_and_stops_on_sigterm(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    mesh = tmp_path / "mesh-config.yaml"
    mesh.write_text(LocalConfig.model_validate(MESH).dump_yaml())
    plan = CaServicePlan.prepare(tmp_path / "ca", ca, mesh, ["node1", "node2"], "127.0.0.1", 0)
    proc, port = _start(plan.argv())
    try:
        token = plan.token_files["node1"].read_text()
        csr, _ = make_csr(SERVER.uri)
        with channel(ca, port) as ch:
            code, _ = status_of(lambda: create_certificate(ch, csr, token=token))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            # A server pod is scheduled on node1: the new mesh config lets node1 ask for it.
            moved = {"workloads": [*MESH["workloads"], {**MESH["workloads"][1], "uid": "s2",
                     "workloadIps": ["10.244.1.3"], "node": "node1"}]}  # fmt: skip
            (tmp_path / "next.yaml").write_text(LocalConfig.model_validate(moved).dump_yaml())
            os.replace(tmp_path / "next.yaml", mesh)
            deadline = time.monotonic() + 10
            while True:
                try:
                    chain = create_certificate(ch, csr, token=token)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "the new mesh config was not picked up"
                    time.sleep(0.1)
        assert verified_identity(chain, ca.root_pem) == SERVER.uri
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_command_bad_input_is_one_line(tmp_path: Path) -> None:
    argv = ["--listen", "127.0.0.1:0", "--root", str(tmp_path / "nothing"),
            "--mesh-config", str(tmp_path / "m.yaml"),
            "--tokens", str(tmp_path / "t.json")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "testbed.mesh.ca_service", *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "cannot load the root" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "testbed.mesh.ca_service", *argv[:1], "localhost:99999"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "expected IP:PORT" in done.stderr
