import ssl
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from testbed.mesh.ca import (
    MAX_WORKLOAD_TTL,
    CertificateAuthority,
    CsrError,
    Identity,
    IssuedCert,
    PeerIdentityError,
    check_peer_identity,
    identity_from_peer_cert,
    parse_csr,
)

SLEEP = Identity("cluster.local", "default", "sleep")
HTTPBIN = Identity("cluster.local", "default", "httpbin")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def _der(issued: IssuedCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(issued.cert_pem.decode())


def _handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two in-memory endpoints; raises ssl.SSLError on failure."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server learns about a rejected client cert only on its first read.
            for side in (client, server):
                with pytest.raises(ssl.SSLWantReadError):
                    side.read()
                s_in.write(c_out.read())
                c_in.write(s_out.read())
            return client, server
    raise AssertionError("handshake did not finish")


def test_identity_uri_round_trip() -> None:
    uri = "spiffe://cluster.local/ns/default/sa/sleep"
    assert Identity.parse(uri) == SLEEP
    assert SLEEP.uri == uri
    assert str(SLEEP) == uri
    assert SLEEP.principal == "cluster.local/ns/default/sa/sleep"


@pytest.mark.parametrize(
    "bad",
    [
        "https://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/namespace/default/sa/sleep",
        "spiffe://cluster.local/ns//sa/sleep",
        "spiffe://cluster.local/ns/default/sa/sleep/extra",
    ],
)
def test_identity_parse_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE identity"):
        Identity.parse(bad)


def test_root_is_a_ca(ca: CertificateAuthority) -> None:
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.trust_domain == "cluster.local"


def test_issued_leaf_has_spiffe_san_and_usages(ca: CertificateAuthority) -> None:
    issued = ca.issue(SLEEP, ttl=timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SLEEP.uri]
    assert san.get_values_for_type(x509.DNSName) == []
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc < leaf.not_valid_after_utc - timedelta(minutes=60)
    assert identity_from_peer_cert(_der(issued)) == SLEEP


def test_each_leaf_gets_a_fresh_serial(ca: CertificateAuthority) -> None:
    serials = {
        x509.load_pem_x509_certificate(ca.issue(SLEEP).cert_pem).serial_number for _ in range(3)
    }
    assert len(serials) == 3


def test_issue_refuses_other_trust_domain(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        ca.issue(Identity("example.org", "default", "sleep"))


def test_mutual_tls_handshake_between_issued_certs(ca: CertificateAuthority) -> None:
    client_cert, server_cert = ca.issue(SLEEP), ca.issue(HTTPBIN)
    client, server = _handshake(client_cert.ssl_client_context(), server_cert.ssl_server_context())
    assert client.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == "h2"
    server_seen = check_peer_identity(
        client.getpeercert(binary_form=True), {HTTPBIN}, "cluster.local"
    )
    client_seen = check_peer_identity(server.getpeercert(binary_form=True), None, "cluster.local")
    assert (server_seen, client_seen) == (HTTPBIN, SLEEP)


def test_server_cert_from_another_ca_fails_handshake(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.create().issue(HTTPBIN)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca.issue(SLEEP).ssl_client_context(), stranger.ssl_server_context())


def test_client_cert_from_another_ca_is_rejected_by_server(ca: CertificateAuthority) -> None:
    stranger = CertificateAuthority.create().issue(SLEEP)
    with pytest.raises(ssl.SSLError):
        _handshake(stranger.ssl_client_context(), ca.issue(HTTPBIN).ssl_server_context())


def test_server_requires_a_client_certificate(ca: CertificateAuthority) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.root_pem.decode())
    with pytest.raises(ssl.SSLError):
        _handshake(anonymous, ca.issue(HTTPBIN).ssl_server_context())


def test_check_peer_identity_rejections() -> None:
    other_td = CertificateAuthority.create("example.org").issue(
        Identity("example.org", "default", "sleep")
    )
    with pytest.raises(PeerIdentityError, match=r"not in trust domain 'cluster\.local'"):
        check_peer_identity(_der(other_td), None, "cluster.local")
    with pytest.raises(PeerIdentityError, match="not one of"):
        check_peer_identity(_der(other_td), {Identity("example.org", "x", "y")}, "example.org")
    with pytest.raises(PeerIdentityError, match="no certificate"):
        check_peer_identity(None, None, "cluster.local")


def test_peer_cert_without_spiffe_san(ca: CertificateAuthority) -> None:
    root_der = ssl.PEM_cert_to_DER_cert(ca.root_pem.decode())  # its SAN is spiffe://<td> only
    assert identity_from_peer_cert(root_der) is None
    with pytest.raises(PeerIdentityError, match="no spiffe"):
        check_peer_identity(root_der, None, "cluster.local")


def test_save_load_round_trip(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.save(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.root_pem == ca.root_pem
    assert loaded.trust_domain == "cluster.local"
    # A leaf from the loaded CA is trusted by a context built from the original.
    _handshake(ca.issue(SLEEP).ssl_client_context(), loaded.issue(HTTPBIN).ssl_server_context())


def test_issued_cert_write(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue(SLEEP)
    cert, key, root = issued.write(tmp_path)
    assert cert.read_bytes() == issued.cert_pem
    assert root.read_bytes() == ca.root_pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, uri: str = SLEEP.uri) -> bytes:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.add_extension(san, critical=True).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def test_signing_a_csr_keeps_its_key_and_names_its_identity(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    request = parse_csr(_csr(key))
    assert request.identity == SLEEP
    leaf_pem, root_pem = ca.sign_csr(request, timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    assert root_pem.encode() == ca.root_pem
    assert leaf.public_key() == key.public_key()
    assert identity_from_peer_cert(leaf.public_bytes(serialization.Encoding.DER)) == SLEEP
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.root_pem))
    with pytest.raises(CsrError, match="longer than the maximum"):
        ca.sign_csr(request, MAX_WORKLOAD_TTL + timedelta(seconds=1))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA key of 1024 bits"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "curve secp521r1"),
    ],
)
def test_weak_or_unexpected_csr_keys_are_refused(
    key: Callable[[], ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey], message: str
) -> None:
    with pytest.raises(CsrError, match=message):
        parse_csr(_csr(key()))


def test_csr_for_a_foreign_trust_domain_is_not_signed(ca: CertificateAuthority) -> None:
    request = parse_csr(_csr(ec.generate_private_key(ec.SECP256R1()), "spiffe://x/ns/a/sa/b"))
    with pytest.raises(ValueError, match=r"serves trust domain 'cluster\.local'"):
        ca.sign_csr(request)
