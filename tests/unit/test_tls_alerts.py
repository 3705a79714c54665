"""The HBONE server refuses bad peers inside the TLS handshake, with the alert Istio's ztunnel
(rustls) sends, and the client refuses a server that is not the expected identity.

The client is independent (Python's ssl + h2, tests/tls_probe.py) and runs in a thread while
the HboneServer serves on loopback."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from hbone_support import Identities, listening_socket, run, tunnel
from tls_probe import client_tls, plaintext_answer, probe

from testbed.mesh.hbone import (
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneError,
    HboneServer,
    server_context,
    tls,
)
from testbed.mesh.hbone.testcerts import Identity, TestPki
from testbed.mesh.hbone.tls import spiffe_refusal, spiffe_trust_domain, verify_spiffe

HOUR = datetime.timedelta(hours=1)


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    pki = TestPki(Path(tmp_path_factory.mktemp("pki")))
    return Identities(pki, pki.identity("ns-b", "sa-b"), pki.identity("ns-a", "sa-a"))


def _outcome(ids: Identities, client: Callable[[socket.socket], str]) -> tuple[str, int]:
    """What the client saw from a real HboneServer, and how many CONNECTs reached policy."""
    calls: list[ConnectRequest] = []

    async def on_connect(request: ConnectRequest) -> ConnectDecision:
        calls.append(request)
        return ConnectDecision.reject(401)

    async def main() -> str:
        server = HboneServer(ids.server_ctx(), on_connect)
        await server.start(listening_socket())
        try:
            sock = socket.create_connection(server.address, timeout=5)
            return await asyncio.to_thread(client, sock)
        finally:
            await server.close()

    return run(main()), len(calls)


def _tls(
    ids: Identities, who: Identity | None, **options: object
) -> Callable[[socket.socket], str]:
    context = client_tls(
        ids.server.roots,
        who.cert if who else None,
        who.key if who else None,
        **options,  # type: ignore[arg-type]
    )
    return lambda sock: probe(sock, context, "127.0.0.1:9")


def test_the_probe_reaches_policy_with_a_good_certificate(ids: Identities) -> None:
    assert _outcome(ids, _tls(ids, ids.client)) == ("status 401", 1)


@pytest.mark.parametrize(
    ("case", "alert"),
    [
        ("no client certificate", "certificate_required"),
        ("foreign CA", "unknown_ca"),
        # Istio's roots are all named O=<trust domain>: another mesh's root has our root's
        # name, so the signature check fails (webpki: BadSignature, OpenSSL alike).
        ("foreign CA with our root's name", "decrypt_error"),
        ("foreign trust domain, trusted CA", "certificate_unknown"),
        ("no SAN", "certificate_unknown"),
        ("SAN not SPIFFE", "certificate_unknown"),
        ("expired", "certificate_expired"),
        ("not yet valid", "certificate_expired"),
        ("TLS 1.2 only", "protocol_version"),
        ("ALPN http/1.1", "no_application_protocol"),
    ],
)
def test_refused_in_the_handshake_with_istios_alert(
    ids: Identities, tmp_path: Path, case: str, alert: str
) -> None:
    pki = ids.pki
    client: Identity | None = ids.client
    options: dict[str, object] = {}
    if case == "no client certificate":
        client = None
    elif case == "foreign CA":
        client = TestPki(tmp_path, trust_domain="other.mesh").identity("ns-a", "sa-a")
    elif case == "foreign CA with our root's name":
        client = TestPki(tmp_path).identity("ns-a", "sa-a")
    elif case == "foreign trust domain, trusted CA":
        client = pki.identity("ns-x", "sa-x", sans=["spiffe://example.org/ns/ns-a/sa/sa-a"])
    elif case == "no SAN":
        client = pki.identity("ns-x", "sa-x", sans=[])
    elif case == "SAN not SPIFFE":
        client = pki.identity("ns-x", "sa-x", sans=["https://ns-a.example/sa-a"])
    elif case == "expired":
        client = pki.identity("ns-x", "sa-x", valid_from=-2 * HOUR, valid_for=HOUR)
    elif case == "not yet valid":
        client = pki.identity("ns-x", "sa-x", valid_from=HOUR, valid_for=HOUR)
    elif case == "TLS 1.2 only":
        options["tls12_only"] = True
    elif case == "ALPN http/1.1":
        options["alpn"] = ["http/1.1"]
    assert _outcome(ids, _tls(ids, client, **options)) == (f"alert {alert}", 0)


def test_no_alpn_is_closed_after_the_handshake(ids: Identities) -> None:
    # Without an ALPN offer OpenSSL calls no ALPN callback, so there is no alert to send.
    assert _outcome(ids, _tls(ids, ids.client, alpn=[])) == ("closed", 0)


def test_plaintext_gets_no_http_answer(ids: Identities) -> None:
    def client(sock: socket.socket) -> str:
        return plaintext_answer(sock, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n").decode("latin-1")

    answer, calls = _outcome(ids, client)
    assert "HTTP" not in answer and calls == 0


def test_client_refuses_an_unexpected_server_with_an_alert(ids: Identities) -> None:
    """Our HboneClient checks the server's SAN during the handshake (ztunnel's
    IdentityVerifier), so the server (here plain Python ssl) receives certificate_unknown."""
    impostor = ids.pki.identity("ns-c", "sa-c")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(impostor.cert, impostor.key)
    server_ctx.set_alpn_protocols(["h2"])
    seen: list[str] = []

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except ssl.SSLError as exc:
            seen.append(str(exc.reason))

    async def main() -> None:
        listener = listening_socket()
        serving = asyncio.create_task(asyncio.to_thread(serve, listener))
        async with tunnel(ids) as t:
            with pytest.raises(HboneError, match="not one of the expected"):
                await t.client.open(
                    listener.getsockname(),
                    "127.0.0.1:9",
                    ssl_context=ids.client_ctx(),
                    expected_identities={ids.server.uri},
                )
        await asyncio.wait_for(serving, 10)
        listener.close()

    run(main())
    assert seen == ["SSLV3_ALERT_CERTIFICATE_UNKNOWN"]


def test_spiffe_rules_match_ztunnels_verifiers() -> None:
    good = "spiffe://cluster.local/ns/a/sa/b"
    assert spiffe_trust_domain(good) == "cluster.local"
    for bad in ("spiffe://cluster.local/ns/a", "spiffe:///ns/a/sa/b", "https://x/ns/a/sa/b"):
        assert spiffe_trust_domain(bad) is None


def test_verify_spiffe_reports_whether_it_is_installed() -> None:
    assert verify_spiffe(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "cluster.local")


def test_refusal_reasons(ids: Identities) -> None:
    der = ssl.PEM_cert_to_DER_cert(ids.client.cert.read_text())
    assert spiffe_refusal(der, "cluster.local", frozenset()) is None
    assert "trust domain 'example.org'" in str(spiffe_refusal(der, "example.org", frozenset()))
    assert spiffe_refusal(der, None, frozenset({ids.client.uri})) is None
    assert "expected" in str(spiffe_refusal(der, None, frozenset({ids.server.uri})))


def test_without_ctypes_the_checks_still_run_after_the_handshake(
    ids: Identities, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where OpenSSL cannot be reached, contexts build without the callbacks and the HBONE
    client still refuses an unexpected server (after the handshake, without an alert)."""
    monkeypatch.setattr(tls, "_openssl", lambda: None)
    assert not verify_spiffe(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "cluster.local")
    impostor = ids.pki.identity("ns-c", "sa-c")

    async def main() -> None:
        server = HboneServer(
            server_context(impostor.cert, impostor.key, impostor.roots),
            lambda request: asyncio.sleep(0, ConnectDecision.reject(401)),
        )
        await server.start(listening_socket())
        client = HboneClient()
        try:
            with pytest.raises(HboneError, match="not one of the expected"):
                await client.open(
                    server.address,
                    "127.0.0.1:9",
                    ssl_context=ids.client_ctx(),
                    expected_identities={ids.server.uri},
                )
        finally:
            await client.close()
            await server.close()

    run(main())
