"""An independent TLS + HTTP/2 CONNECT probe (Python's ssl and the h2 library, none of our
HBONE code) that reports how a server refused it: the TLS alert it sent, the CONNECT's
status, or a close without either. The unit tests run it on loopback, the negatives matrix
from inside a pod.

    outcome = probe(sock, client_tls(roots, cert, key), "10.0.0.7:8080")
    # "alert certificate_required", "status 401", "status 200", "closed", "timeout"
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def client_tls(
    roots: Path,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    alpn: list[str] | None = None,
    tls12_only: bool = False,
) -> ssl.SSLContext:
    """A client context trusting `roots` (no hostname check: HBONE names peers by URI SAN),
    presenting `cert` if given, offering `alpn` (default h2; [] offers none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(roots)
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    offered = ["h2"] if alpn is None else alpn
    if offered:
        context.set_alpn_protocols(offered)
    return context


def alert_name(error: ssl.SSLError) -> str | None:
    """`TLSV13_ALERT_CERTIFICATE_REQUIRED` -> `certificate_required`; None if not an alert."""
    reason = error.reason or ""
    if "_ALERT_" in reason:
        return reason.split("_ALERT_", 1)[1].lower()
    # Alerts newer than CPython's error table come only as OpenSSL's text.
    found = re.search(r"alert ([a-z ]+?) \(", str(error))
    return found.group(1).replace(" ", "_") if found else None


def _refusal(error: OSError) -> str:
    if isinstance(error, ssl.SSLError) and (name := alert_name(error)) is not None:
        return f"alert {name}"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timeout"
    return "closed"  # FIN, RST, or a TLS error without an alert


def probe(
    sock: socket.socket, context: ssl.SSLContext, authority: str, request: bytes | None = None
) -> str:
    """Handshake over the connected `sock`, then CONNECT `authority`; the outcome (above).
    With `request`, a 200 is followed by sending it through the tunnel, and the outcome is
    the status line of the answer: "http 403" ("http closed" if none came).

    In TLS 1.3 the client's handshake ends before the server has checked the client's
    certificate, so a refusal of it arrives as an alert on the first read."""
    try:
        tls = context.wrap_socket(sock)
    except OSError as exc:
        sock.close()
        return _refusal(exc)
    with tls:
        try:
            return _connect(tls, authority, request)
        except OSError as exc:
            return _refusal(exc)


_ENDINGS = (h2.events.StreamReset, h2.events.StreamEnded, h2.events.ConnectionTerminated)


def _connect(tls: ssl.SSLSocket, authority: str, request: bytes | None) -> str:
    # h2 insists on :scheme and :path even for CONNECT; HBONE's CONNECT has neither.
    conn = h2.connection.H2Connection(h2.config.H2Configuration(validate_outbound_headers=False))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    headers = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    conn.send_headers(stream_id, headers)
    tls.sendall(conn.data_to_send())
    status: int | None = None
    answer = b""
    while True:
        data = tls.recv(65536)
        if not data:
            return "closed" if status is None else "http closed"
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return "closed"
        for event in events:
            if isinstance(event, h2.events.ResponseReceived) and status is None:
                status = int(dict(event.headers)[b":status"])
                if status != 200 or request is None:
                    return f"status {status}"
                conn.send_data(stream_id, request)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                answer += event.data
                if b"\r\n" in answer:
                    return "http " + answer.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
            elif isinstance(event, _ENDINGS):
                return "closed" if status is None else "http closed"
        tls.sendall(conn.data_to_send())


def plaintext_answer(sock: socket.socket, request: bytes) -> bytes:
    """Send `request` in the clear and read until the server closes (what came back)."""
    with sock:
        answer = b""
        try:
            sock.sendall(request)
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        return answer
