"""TLS for HBONE: mutual TLS 1.3 contexts with ALPN h2, SPIFFE identities, and `TlsSession`.

Both contexts put TLS_AES_128_GCM_SHA256 first (OpenSSL's default order starts with AES-256,
which costs 5-20% more per byte for the same AEAD construction). Python 3.11's `ssl` has no
call for the TLS 1.3 suites (`set_ciphers` covers TLS 1.2 only), so `prefer_aes128` calls
OpenSSL's SSL_CTX_set_ciphersuites through ctypes on the context's SSL_CTX, after checking
that the pointer it found is that context (its options read back equal); where that check
fails, the context keeps OpenSSL's default order and `prefer_aes128` returns False.

`TlsSession` drives an `ssl.SSLObject` over two `MemoryBIO`s, so TLS runs on our own large
buffers (asyncio's SSL transport reads and writes 16 KiB records one at a time, which measured
slower). Plaintext is decrypted into a buffer the caller provides (and recycles).
"""

from __future__ import annotations

import ctypes
import functools
import ssl
from pathlib import Path

from cryptography import x509

ALPN_H2 = "h2"
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


@functools.cache
def _openssl() -> ctypes.CDLL | None:
    try:
        import _ssl  # the extension module: its handle also finds libssl's symbols

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    except (ImportError, OSError, AttributeError):
        return None
    return lib


def prefer_aes128(context: ssl.SSLContext) -> bool:
    """Order the TLS 1.3 suites AES-128-GCM first; returns whether it could."""
    lib = _openssl()
    if lib is None:
        return False
    # CPython's context object is a PyObject header followed by its SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != context.options:
        return False
    return bool(lib.SSL_CTX_set_ciphersuites(pointer, TLS13_SUITES))


def _base_context(purpose: ssl.Purpose, cert: Path, key: Path, roots: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(roots))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # identities are URI SANs, checked by the HBONE layer
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN_H2])
    context.load_cert_chain(str(cert), str(key))
    prefer_aes128(context)
    return context


def server_context(cert: Path, key: Path, roots: Path) -> ssl.SSLContext:
    """Server side: requires a client certificate chaining to `roots`."""
    return _base_context(ssl.Purpose.CLIENT_AUTH, cert, key, roots)


def client_context(cert: Path, key: Path, roots: Path) -> ssl.SSLContext:
    """Client side: presents `cert` and verifies the server against `roots` (no hostname)."""
    return _base_context(ssl.Purpose.SERVER_AUTH, cert, key, roots)


def uri_sans(der_cert: bytes) -> list[str]:
    """The URI subject alternative names of a DER certificate (SPIFFE IDs)."""
    cert = x509.load_der_x509_certificate(der_cert)
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

    def feed(self, ciphertext: memoryview) -> None:
        self._incoming.write(ciphertext)

    def handshake(self) -> bool:
        """Advance the handshake with the fed bytes; True once it has completed."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
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
