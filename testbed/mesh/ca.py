"""SPIFFE identities and a small certificate authority for the mesh.

Istio identifies a workload by the URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` of its
certificate. Keys are ECDSA P-256, as Istio's own CA issues them. HBONE peers verify each other
against the root and check the URI SAN (not a hostname) inside the handshake (hbone.tls).

The CA issues key pairs itself (`issue`, for the testbed's own proxies, which read files) and
signs certificate signing requests (`sign_csr`, for testbed.mesh.ca_service, which speaks
Istio's CA protocol to Istio's ztunnel). Both kinds of leaf are the same apart from the key.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testbed.mesh.hbone.tls import (
    certificate_uri_sans,
    client_context,
    server_context,
    uri_sans,
)
from testbed.netlab.errors import TestbedError

SPIFFE_SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
# File names Istio's workload certificate volume uses.
CERT_CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
ROOT_CERT_FILE = "root-cert.pem"
# Clocks of namespaces on one host agree, but a minute of slack keeps fresh certs valid anyway.
CLOCK_SKEW = timedelta(minutes=1)
ROOT_TTL = timedelta(days=3650)
WORKLOAD_TTL = timedelta(hours=24)
# istiod's default MAX_WORKLOAD_CERT_TTL; a longer request is refused, as istiod refuses it.
MAX_WORKLOAD_TTL = timedelta(days=90)
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form Istio's AuthorizationPolicy `principals` use: the URI without `spiffe://`."""
        return self.uri.removeprefix(SPIFFE_SCHEME)

    @classmethod
    def parse(cls, uri: str) -> Identity:
        expected = "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
        if not uri.startswith(SPIFFE_SCHEME):
            raise ValueError(f"not a SPIFFE identity: {uri!r} ({expected})")
        parts = uri.removeprefix(SPIFFE_SCHEME).split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise ValueError(f"malformed SPIFFE identity: {uri!r} ({expected})")
        return cls(trust_domain=parts[0], namespace=parts[2], service_account=parts[4])

    def __str__(self) -> str:
        return self.uri


class PeerIdentityError(TestbedError):
    """The peer's certificate does not carry an acceptable SPIFFE identity."""


class CsrError(TestbedError, ValueError):
    """A certificate signing request that cannot be signed; the message says why."""


PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class SigningRequest:
    """A verified CSR: its public key and the one SPIFFE identity its URI SAN asks for."""

    public_key: PublicKey
    identity: Identity


def parse_csr(pem: str | bytes) -> SigningRequest:
    """Check a PEM CSR (signature, key, exactly one spiffe:// URI SAN) and read it."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CsrError(f"not a PEM certificate signing request ({e})") from None
    if not csr.is_signature_valid:
        raise CsrError("the CSR's signature does not verify with its own public key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CsrError(f"EC key on curve {key.curve.name}; expected P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits; expected at least {MIN_RSA_BITS}")
    else:
        raise CsrError(f"{type(key).__name__} key; expected ECDSA (P-256) or RSA")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        uris = []
    if len(uris) != 1:
        raise CsrError(f"the CSR names {len(uris)} URI SANs; expected one spiffe:// identity")
    try:
        return SigningRequest(key, Identity.parse(uris[0]))
    except ValueError as e:
        raise CsrError(str(e)) from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file that is never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class IssuedCert:
    identity: Identity
    cert_pem: bytes
    key_pem: bytes
    root_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """Write (cert chain, key, root) PEM files; the key is mode 0600."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key, root = (
            directory / CERT_CHAIN_FILE,
            directory / KEY_FILE,
            directory / ROOT_CERT_FILE,
        )
        cert.write_bytes(self.cert_pem)
        _write_private(key, self.key_pem)
        root.write_bytes(self.root_pem)
        return cert, key, root

    def ssl_server_context(self) -> ssl.SSLContext:
        """The HBONE server context (tls.server_context) for this key pair. Build once and
        reuse: the ssl module loads key pairs only from files, so this writes some."""
        return self._context(server_context)

    def ssl_client_context(self) -> ssl.SSLContext:
        """The HBONE client context (tls.client_context) for this key pair."""
        return self._context(client_context)

    def _context(self, make: Callable[[Path, Path, Path], ssl.SSLContext]) -> ssl.SSLContext:
        with tempfile.TemporaryDirectory(prefix="tbt-cert-") as tmp:
            return make(*self.write(Path(tmp)))


class CertificateAuthority:
    """A self-signed root that issues workload certificates for one trust domain."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str):
        self._cert = cert
        self._key = key
        self.trust_domain = trust_domain
        self.root_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        # Istio's self-signed root names the trust domain as its organization.
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            # SPIFFE: a CA certificate may carry its trust domain as a URI SAN; load() reads it.
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(SPIFFE_SCHEME + trust_domain)]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_CERT_FILE).write_bytes(self.root_pem)
        _write_private(directory / CA_KEY_FILE, _key_pem(self._key))

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key(
            (directory / CA_KEY_FILE).read_bytes(), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / CA_KEY_FILE}: expected an ECDSA private key")
        return cls(cert, key, _root_trust_domain(cert))

    def issue(self, identity: Identity, ttl: timedelta = WORKLOAD_TTL) -> IssuedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._workload_cert(key.public_key(), identity, ttl)
        return IssuedCert(
            identity=identity,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            root_pem=self.root_pem,
        )

    def sign_csr(self, request: SigningRequest, ttl: timedelta = WORKLOAD_TTL) -> list[str]:
        """The PEM chain for a verified CSR, leaf first and root last (Istio's order)."""
        if ttl > MAX_WORKLOAD_TTL:
            raise CsrError(f"requested TTL {ttl} is longer than the maximum {MAX_WORKLOAD_TTL}")
        cert = self._workload_cert(request.public_key, request.identity, ttl)
        return [cert.public_bytes(serialization.Encoding.PEM).decode(), self.root_pem.decode()]

    def issue_server_cert(
        self, dns_names: list[str], ips: list[IPv4Address | IPv6Address], ttl: timedelta = ROOT_TTL
    ) -> tuple[bytes, bytes]:
        """A TLS server certificate and key (PEM) for a control-plane service, like istiod's."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ip) for ip in ips]
        cert = (
            self._leaf_builder(key.public_key(), ttl)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def _workload_cert(
        self, public_key: PublicKey, identity: Identity, ttl: timedelta
    ) -> x509.Certificate:
        if identity.trust_domain != self.trust_domain:
            raise ValueError(
                f"cannot issue {identity.uri}: this CA serves trust domain {self.trust_domain!r}"
            )
        return (
            self._leaf_builder(public_key, ttl)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    def _leaf_builder(self, public_key: PublicKey, ttl: timedelta) -> x509.CertificateBuilder:
        now = _now()
        return (
            x509.CertificateBuilder()
            # Istio workload certificates have an empty subject, so the SAN must be critical.
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _root_trust_domain(cert: x509.Certificate) -> str:
    for uri in certificate_uri_sans(cert):
        if uri.startswith(SPIFFE_SCHEME):
            return uri.removeprefix(SPIFFE_SCHEME).rstrip("/")
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if orgs:
        return str(orgs[0].value)
    raise ValueError("root certificate names no trust domain (no spiffe:// SAN, no O=)")


def identity_from_peer_cert(der: bytes) -> Identity | None:
    """The SPIFFE identity in a DER certificate's URI SAN, or None if it has none."""
    for uri in uri_sans(der):
        try:
            return Identity.parse(uri)
        except ValueError:
            continue
    return None


def check_peer_identity(
    der: bytes | None, expected: Collection[Identity] | None, trust_domain: str
) -> Identity:
    """The peer's identity if acceptable: in `trust_domain` and, unless None, in `expected`."""
    if der is None:
        raise PeerIdentityError("peer presented no certificate")
    identity = identity_from_peer_cert(der)
    if identity is None:
        raise PeerIdentityError("peer certificate has no spiffe:// URI SAN")
    if identity.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"peer identity {identity.uri} is not in trust domain {trust_domain!r}"
        )
    if expected is not None and identity not in expected:
        wanted = ", ".join(sorted(i.uri for i in expected)) or "(none)"
        raise PeerIdentityError(f"peer identity {identity.uri} is not one of: {wanted}")
    return identity
