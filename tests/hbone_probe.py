"""An independent HBONE client for integration tests: h2 + ssl from inside a pod, with a
certificate the test issued, so a test can dial a pod's 15008 the way no ztunnel would."""

from __future__ import annotations

import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from podapps import connect

from testbed.cluster import Pod


class H2Connect:
    """An independent HBONE client (h2 + ssl) from a pod; one CONNECT per call."""

    def __init__(self, pod: Pod, server_ip: str, cert_dir: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cert_dir / "root-cert.pem")
        context.load_cert_chain(cert_dir / "cert-chain.pem", cert_dir / "key.pem")
        context.set_alpn_protocols(["h2"])
        raw = connect(pod, server_ip, 15008)
        self.sock = context.wrap_socket(raw)
        # h2 insists on :scheme and :path even for CONNECT; HBONE's CONNECT has neither.
        config = h2.config.H2Configuration(validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def status(self, authority: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id, [(b":method", b"CONNECT"), (b":authority", authority.encode())]
        )
        self.sock.sendall(self.conn.data_to_send())
        while True:
            data = self.sock.recv(65536)
            assert data, "connection closed before a response"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    return int(dict(event.headers)[b":status"])
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()
