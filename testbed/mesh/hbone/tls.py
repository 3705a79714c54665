"""TLS for HBONE: mutual TLS 1.3 contexts with ALPN h2, SPIFFE identities, and `TlsSession`.

Both contexts put TLS_AES_128_GCM_SHA256 first (OpenSSL's default order starts with AES-256,
which costs 5-20% more per byte for the same AEAD construction). Python 3.11's `ssl` has no
call for the TLS 1.3 suites (`set_ciphers` covers TLS 1.2 only), so `prefer_aes128` calls
OpenSSL's SSL_CTX_set_ciphersuites through ctypes on the context's SSL_CTX, after checking
that the pointer it found is that context (its options read back equal); where that check
fails, the context keeps OpenSSL's default order and `prefer_aes128` returns False.

Peer identities are checked inside the handshake, as Istio's ztunnel does (its rustls
verifiers `TrustDomainVerifier` and `IdentityVerifier`), so a refused peer gets a TLS alert
rather than a bare close. Python's `ssl` has no verify callback, so `verify_spiffe` installs
one on the SSL_CTX through ctypes (SSL_CTX_set_verify); the server side also refuses a client
that offers ALPN without h2 with `no_application_protocol` (SSL_CTX_set_alpn_select_cb), where
CPython's own callback would carry on without ALPN. Alerts, as rustls sends them:
missing client certificate -> certificate_required, unknown issuer -> unknown_ca, expired or
not yet valid -> certificate_expired, a URI SAN outside the trust domain (or none, or not
SPIFFE) or a server identity that is not the expected one -> certificate_unknown. Where ctypes
cannot reach OpenSSL the same checks run after the handshake (the HBONE layer and the
inbound policy) and the peer sees the connection close instead of an alert.

`TlsSession` drives an `ssl.SSLObject` over two `MemoryBIO`s, so TLS runs on our own large
buffers (asyncio's SSL transport reads and writes 16 KiB records one at a time, which measured
slower). Plaintext is decrypted into a buffer the caller provides (and recycles).
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import weakref
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from testbed.netlab.errors import TestbedError

ALPN_H2 = "h2"
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
SPIFFE_SCHEME = "spiffe://"

# OpenSSL's X509_V_ERR_* codes; OpenSSL turns the code a verification ends with into the alert.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10  # -> certificate_expired
# OpenSSL has no code for "URI SAN not acceptable". X509_V_ERR_PERMITTED_VIOLATION ("permitted
# subtree violation": a name outside what is allowed) is the nearest, and it is not in
# OpenSSL's code-to-alert table, so it becomes certificate_unknown: the alert rustls sends for
# ztunnel's SAN errors (CertificateError::Other). Only the alert reaches the peer; our log
# line gives the real reason.
X509_V_ERR_SAN_REFUSED = 47
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2  # OpenSSL then sends no_application_protocol

_VerifyCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_AlpnCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
)


class PeerRefused(TestbedError, ConnectionError):
    """The peer's certificate failed the SPIFFE check during the handshake (an alert was sent)."""


def _declare(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> None:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)


@functools.cache
def _openssl() -> ctypes.CDLL | None:
    vp, i = ctypes.c_void_p, ctypes.c_int
    try:
        import _ssl  # the extension module: its handle also finds libssl's symbols

        lib = ctypes.CDLL(_ssl.__file__)
        _declare(lib, "SSL_CTX_get_options", ctypes.c_uint64, vp)
        _declare(lib, "SSL_CTX_set_ciphersuites", i, vp, ctypes.c_char_p)
        _declare(lib, "SSL_CTX_get_verify_mode", i, vp)
        _declare(lib, "SSL_CTX_set_verify", None, vp, i, _VerifyCallback)
        _declare(lib, "SSL_CTX_set_alpn_select_cb", None, vp, _AlpnCallback, vp)
        _declare(lib, "SSL_get_ex_data_X509_STORE_CTX_idx", i)
        _declare(lib, "SSL_get_ex_data", vp, vp, i)
        _declare(lib, "SSL_get_SSL_CTX", vp, vp)
        _declare(lib, "X509_STORE_CTX_get_ex_data", vp, vp, i)
        _declare(lib, "X509_STORE_CTX_get_error", i, vp)
        _declare(lib, "X509_STORE_CTX_set_error", None, vp, i)
        _declare(lib, "X509_STORE_CTX_get_error_depth", i, vp)
        _declare(lib, "X509_STORE_CTX_get_current_cert", vp, vp)
        _declare(lib, "i2d_X509", i, vp, ctypes.POINTER(ctypes.c_void_p))
    except (ImportError, OSError, AttributeError):
        return None
    return lib


def _ssl_ctx(lib: ctypes.CDLL, context: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer of `context`, or None if the one found is not provably it."""
    # CPython's context object is a PyObject header followed by its SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != context.options:
        return None
    return int(pointer)


def prefer_aes128(context: ssl.SSLContext) -> bool:
    """Order the TLS 1.3 suites AES-128-GCM first; returns whether it could."""
    lib = _openssl()
    pointer = None if lib is None else _ssl_ctx(lib, context)
    if lib is None or pointer is None:
        return False
    return bool(lib.SSL_CTX_set_ciphersuites(pointer, TLS13_SUITES))


def spiffe_trust_domain(uri: str) -> str | None:
    """The trust domain of `spiffe://<td>/ns/<ns>/sa/<sa>`, None for anything else."""
    if not uri.startswith(SPIFFE_SCHEME):
        return None
    trust_domain, _, path = uri.removeprefix(SPIFFE_SCHEME).partition("/")
    parts = path.split("/")
    if not trust_domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    if not (parts[1] and parts[3]):
        return None
    return trust_domain


def spiffe_refusal(
    der_cert: bytes, trust_domain: str | None, expected: frozenset[str]
) -> str | None:
    """Why a peer certificate is not acceptable (None if it is), as ztunnel's verifiers judge.

    Server side: some URI SAN must be a SPIFFE identity in `trust_domain`. Client side: some
    URI SAN must be one of the `expected` identities (empty: no check)."""
    uris = uri_sans(der_cert)
    if trust_domain is not None and trust_domain not in map(spiffe_trust_domain, uris):
        return f"peer identities {uris} name no SPIFFE identity in trust domain {trust_domain!r}"
    if expected and expected.isdisjoint(uris):
        return f"peer identities {uris} are not one of the expected {sorted(expected)}"
    return None


# What the verify callback checks, by SSL_CTX pointer (trust domain) and by CPython SSL object
# (the identities a client expects of this one server); refusal reasons for the log.
_trust_domains: dict[int, str | None] = {}
_expected: dict[int, frozenset[str]] = {}
_refusals: dict[int, str] = {}


def _peer_der(lib: ctypes.CDLL, store: int) -> bytes:
    cert = lib.X509_STORE_CTX_get_current_cert(store)
    size = lib.i2d_X509(cert, None)
    if size <= 0:
        return b""
    buffer = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))
    lib.i2d_X509(cert, ctypes.byref(cursor))
    return buffer.raw[:size]


def _check_chain(preverify_ok: int, store: int) -> int:
    lib = _openssl()
    assert lib is not None  # only ever installed through it
    if not preverify_ok:
        if lib.X509_STORE_CTX_get_error(store) == X509_V_ERR_CERT_NOT_YET_VALID:
            # OpenSSL would send bad_certificate; rustls sends certificate_expired for both.
            lib.X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_HAS_EXPIRED)
        return 0
    if lib.X509_STORE_CTX_get_error_depth(store) != 0:
        return 1  # the chain above the leaf: OpenSSL's checks are all
    ssl_ptr = lib.X509_STORE_CTX_get_ex_data(store, lib.SSL_get_ex_data_X509_STORE_CTX_idx())
    owner = int(lib.SSL_get_ex_data(ssl_ptr, 0) or 0)  # CPython keeps its object as app data
    trust_domain = _trust_domains.get(int(lib.SSL_get_SSL_CTX(ssl_ptr) or 0))
    try:
        reason = spiffe_refusal(_peer_der(lib, store), trust_domain, _expected.get(owner, _NONE))
    except ValueError as exc:  # a certificate cryptography cannot read
        reason = f"unreadable peer certificate: {exc}"
    if reason is None:
        return 1
    _refusals[owner] = reason
    lib.X509_STORE_CTX_set_error(store, X509_V_ERR_SAN_REFUSED)
    return 0


_NONE: frozenset[str] = frozenset()


def _forget_session(key: int) -> None:
    _expected.pop(key, None)
    _refusals.pop(key, None)


def _verify(preverify_ok: int, store: int) -> int:
    try:
        return _check_chain(preverify_ok, store)
    except Exception:  # never let an exception cross into OpenSSL: refuse instead
        return 0


def _select_alpn(
    _ssl_ptr: int,
    out: ctypes._Pointer[ctypes.c_void_p],
    outlen: ctypes._Pointer[ctypes.c_ubyte],
    offered: int,
    offered_len: int,
    _arg: int,
) -> int:
    try:
        data = ctypes.string_at(offered, offered_len)
        at = 0
        while at < len(data):
            size = data[at]
            if data[at + 1 : at + 1 + size] == ALPN_H2.encode():
                out[0] = offered + at + 1
                outlen[0] = size
                return SSL_TLSEXT_ERR_OK
            at += 1 + size
    except Exception:
        pass
    return SSL_TLSEXT_ERR_ALERT_FATAL


# Module globals: OpenSSL keeps calling them as long as any context does.
_verify_callback = _VerifyCallback(_verify)
_alpn_callback = _AlpnCallback(_select_alpn)


def verify_spiffe(context: ssl.SSLContext, trust_domain: str | None) -> bool:
    """Check SPIFFE identities inside the handshake; returns whether it could be installed.

    `trust_domain` (server side): the client's certificate must name an identity in it. A
    client's expected server identities are given per connection (`TlsSession.expect_peer`).
    A server context also refuses ALPN offers without h2 with no_application_protocol."""
    lib = _openssl()
    pointer = None if lib is None else _ssl_ctx(lib, context)
    if lib is None or pointer is None:
        return False
    _trust_domains[pointer] = trust_domain
    lib.SSL_CTX_set_verify(pointer, lib.SSL_CTX_get_verify_mode(pointer), _verify_callback)
    if context.protocol == ssl.PROTOCOL_TLS_SERVER:
        lib.SSL_CTX_set_alpn_select_cb(pointer, _alpn_callback, None)
    return True


def cert_trust_domain(cert: Path) -> str | None:
    """The trust domain of the first SPIFFE URI SAN of a PEM certificate file."""
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    domains = [td for td in map(spiffe_trust_domain, certificate_uri_sans(leaf)) if td is not None]
    return domains[0] if domains else None


def _base_context(purpose: ssl.Purpose, cert: Path, key: Path, roots: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(roots))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # identities are URI SANs, checked by verify_spiffe
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_H2])
    context.load_cert_chain(str(cert), str(key))
    prefer_aes128(context)
    return context


def server_context(cert: Path, key: Path, roots: Path) -> ssl.SSLContext:
    """Server side: requires a client certificate chaining to `roots` whose URI SAN is in the
    trust domain of our own certificate (ztunnel takes it from its own identity, too)."""
    context = _base_context(ssl.Purpose.CLIENT_AUTH, cert, key, roots)
    verify_spiffe(context, cert_trust_domain(cert))
    return context


def client_context(cert: Path, key: Path, roots: Path) -> ssl.SSLContext:
    """Client side: presents `cert` and verifies the server against `roots` (no hostname) and,
    per connection, against the identities `TlsSession.expect_peer` names."""
    context = _base_context(ssl.Purpose.SERVER_AUTH, cert, key, roots)
    verify_spiffe(context, None)
    return context


def uri_sans(der_cert: bytes) -> list[str]:
    """The URI subject alternative names of a DER certificate (SPIFFE IDs)."""
    return certificate_uri_sans(x509.load_der_x509_certificate(der_cert))


def certificate_uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI subject alternative names of a parsed certificate."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value.get_values_for_type(x509.UniformResourceIdentifier))


class TlsSession:
    def __init__(self, context: ssl.SSLContext, server_side: bool) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self.established = False
        # The CPython object OpenSSL's verify callback finds as the connection's app data.
        self._key = id(self._ssl._sslobj)  # type: ignore[attr-defined]
        weakref.finalize(self, _forget_session, self._key)

    def expect_peer(self, identities: Iterable[str]) -> None:
        """Client side: refuse, during the handshake, a server that is none of `identities`."""
        _expected[self._key] = frozenset(identities)

    def feed(self, ciphertext: memoryview) -> None:
        self._incoming.write(ciphertext)

    def handshake(self) -> bool:
        """Advance the handshake with the fed bytes; True once it has completed."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            # The alert OpenSSL chose waits in `take_output()`: the driver must send it.
            reason = _refusals.pop(self._key, None)
            if reason is not None:
                raise PeerRefused(f"{reason} (TLS alert sent)") from exc
            raise
        self.established = True
        return True

    def plaintext_bound(self) -> int:
        """An upper bound on what `decrypt_into` can produce now."""
        return self._incoming.pending + self._ssl.pending()

    def decrypt_into(self, buffer: bytearray) -> memoryview:
        """All plaintext decryptable from the fed bytes (up to `len(buffer)`), in `buffer`."""
        incoming, sslobj = self._incoming, self._ssl
        view = memoryview(buffer)
        filled = 0
        try:
            # Stop as soon as nothing is left to read: an SSLWantReadError costs ~7 us.
            while filled < len(buffer):
                count = sslobj.read(len(buffer) - filled, view[filled:])  # type: ignore[arg-type]
                assert isinstance(count, int)
                filled += count
                if not count or not (incoming.pending or sslobj.pending()):
                    break  # close_notify, or all fed records consumed
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass  # no more complete records, or the peer sent close_notify
        return view[:filled]

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> None:
        self._ssl.write(plaintext)

    def take_output(self) -> bytes:
        """Ciphertext waiting to be sent."""
        return self._outgoing.read()

    def peer_identities(self) -> list[str]:
        der = self._ssl.getpeercert(binary_form=True)
        return uri_sans(der) if der else []

    def cipher(self) -> str | None:
        chosen = self._ssl.cipher()
        return chosen[0] if chosen else None

    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol()
