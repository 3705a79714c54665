"""The native peer: HAProxy as an mTLS TCP tunnel between two nodes, on a `none` cluster.

    client pod -> HAProxy on the client's node (plain TCP in, TLS out)
               -> HAProxy on the server's node (TLS in, plain TCP out) -> server pod

The same path as two ztunnels (pod -> node -> node -> pod) and the same credentials: ECDSA
P-256 certificates with SPIFFE URI SANs from the mesh CA, TLS 1.3 with AES-128-GCM first,
both sides verifying the peer's chain (HAProxy cannot match a URI SAN, so the identity itself
is not checked; that costs ztunnel one string compare). One thread per side. The client
connects to its node's address on the app port; each app port has its own TLS port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.mesh.ca import CertificateAuthority, Identity
from testbed.netlab import NetlabError

TLS_PORT_OFFSET = 10000
SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
READY_TIMEOUT = 10.0


class NativePeerError(NetlabError):
    """HAProxy did not come up."""


@dataclass(frozen=True)
class Tunnel:
    """Where the client connects (its node's address) and the HAProxy pids (for CPU, RSS)."""

    address: str
    pids: list[int]


def _global_section() -> list[str]:
    return [
        "global",
        "    nbthread 1",
        "    maxconn 8000",
        f"    ssl-default-bind-ciphersuites {SUITES}",
        f"    ssl-default-server-ciphersuites {SUITES}",
        "    ssl-default-bind-options ssl-min-ver TLSv1.3",
        "    ssl-default-server-options ssl-min-ver TLSv1.3",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 120s",
        "    timeout server 120s",
    ]


def client_config(bind_ip: str, peer_ip: str, ports: Sequence[int], pem: Path, root: Path) -> str:
    lines = _global_section()
    for port in ports:
        lines += [
            f"frontend app_{port}",
            f"    bind {bind_ip}:{port}",
            f"    default_backend tls_{port}",
            f"backend tls_{port}",
            f"    server peer {peer_ip}:{port + TLS_PORT_OFFSET} ssl crt {pem} ca-file {root}"
            " verify required",
        ]
    return "\n".join(lines) + "\n"


def server_config(bind_ip: str, app_ip: str, ports: Sequence[int], pem: Path, root: Path) -> str:
    lines = _global_section()
    for port in ports:
        lines += [
            f"frontend tls_{port}",
            f"    bind {bind_ip}:{port + TLS_PORT_OFFSET} ssl crt {pem} ca-file {root}"
            " verify required",
            f"    default_backend app_{port}",
            f"backend app_{port}",
            f"    server app {app_ip}:{port}",
        ]
    return "\n".join(lines) + "\n"


def _write_pem(ca: CertificateAuthority, identity: Identity, directory: Path) -> tuple[Path, Path]:
    issued = ca.issue(identity)
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / f"{identity.service_account}.pem"
    pem.write_bytes(issued.cert_pem + issued.key_pem)
    pem.chmod(0o600)
    root = directory / "root-cert.pem"
    root.write_bytes(issued.root_pem)
    return pem, root


def _wait_listening(netns: Any, ports: Sequence[int], process: Any) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NativePeerError(f"haproxy exited: {process.output()[-500:]}")
        listening = netns.run(["ss", "-Hltn"], check=False).stdout
        if all(f":{port} " in listening for port in ports):
            return
        time.sleep(0.1)
    raise NativePeerError(f"haproxy did not listen on {list(ports)} in {READY_TIMEOUT:g} s")


@contextmanager
def haproxy_tunnel(
    client_node: Any, server_node: Any, server_ip: str, ports: Sequence[int], workdir: Path
) -> Iterator[Tunnel]:
    """Start both HAProxy sides in the nodes' namespaces; stop them at the end."""
    ca = CertificateAuthority.create()
    client_pem, root = _write_pem(ca, Identity("cluster.local", "bench", "client"), workdir)
    server_pem, _ = _write_pem(ca, Identity("cluster.local", "bench", "server"), workdir)
    configs = {
        "client": client_config(
            client_node.underlay_ip, server_node.underlay_ip, ports, client_pem, root
        ),
        "server": server_config(server_node.underlay_ip, server_ip, ports, server_pem, root),
    }
    with ExitStack() as stack:
        pids = []
        for side, node, listen in (
            ("server", server_node, [p + TLS_PORT_OFFSET for p in ports]),
            ("client", client_node, list(ports)),
        ):
            path = workdir / f"haproxy-{side}.cfg"
            path.write_text(configs[side])
            process = node.netns.spawn(["haproxy", "-db", "-f", str(path)], label=f"haproxy-{side}")
            stack.callback(process.terminate)
            _wait_listening(node.netns, listen, process)
            pids.append(process.pid)
        yield Tunnel(client_node.underlay_ip, pids)
