"""Throwaway SPIFFE certificates for HBONE tests and benchmarks (the mesh CA lives in ca.py).

bundle = TestPki(tmp_path)
server = bundle.identity("ns-b", "sa-b")   # -> Identity(cert, key, roots, uri)
ctx = server_context(server.cert, server.key, server.roots)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    roots: Path
    uri: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestPki:
    """A root CA in `directory` issuing ECDSA P-256 leaves with a SPIFFE URI SAN."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        directory: Path,
        trust_domain: str = "cluster.local",
        *,
        root: tuple[Path, Path] | None = None,
    ) -> None:
        """A new root, or with `root` = (CA cert, CA key) PEM files an existing one (e.g. a
        mesh CA that `CertificateAuthority.save` wrote), to issue leaves it would not."""
        self.directory = directory
        self.trust_domain = trust_domain
        if root is None:
            self._key = ec.generate_private_key(ec.SECP256R1())
            self._cert = self._self_signed(trust_domain)
        else:
            key = serialization.load_pem_private_key(root[1].read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{root[1]}: expected an ECDSA private key")
            self._key = key
            self._cert = x509.load_pem_x509_certificate(root[0].read_bytes())
        self._name = self._cert.subject
        directory.mkdir(parents=True, exist_ok=True)
        self.roots = directory / "root-cert.pem"
        self.roots.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _self_signed(self, trust_domain: str) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def identity(
        self,
        namespace: str,
        service_account: str,
        *,
        sans: list[str] | None = None,
        valid_from: datetime.timedelta = -datetime.timedelta(minutes=5),
        valid_for: datetime.timedelta = _VALIDITY,
    ) -> Identity:
        """A leaf for `spiffe://<td>/ns/<namespace>/sa/<sa>`; for negative tests, `sans`
        replaces its URI SANs (an empty list: no SAN at all) and `valid_from` (relative to
        now) and `valid_for` move its validity window."""
        uri = f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"
        uris = [uri] if sans is None else sans
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.datetime.now(datetime.UTC) + valid_from
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]) if uris else self._leaf_name(namespace))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if uris:
            names = [x509.UniformResourceIdentifier(u) for u in uris]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = f"{namespace}.{service_account}"
        cert_path = self.directory / f"{stem}.cert.pem"
        key_path = self.directory / f"{stem}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(key))
        return Identity(cert_path, key_path, self.roots, uris[0] if uris else "")

    @staticmethod
    def _leaf_name(common_name: str) -> x509.Name:
        # A leaf without SANs needs a subject (RFC 5280 4.1.2.6).
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
