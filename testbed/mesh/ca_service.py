"""A CA service speaking Istio's CA protocol, for Istio's own ztunnel in the testbed.

gRPC `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS (the server certificate
is signed by the testbed's root, so `CA_ROOT_CA` is that root), on istiod's port 15012:

- The caller authenticates with `authorization: Bearer <token>`. The testbed gives each node's
  ztunnel its own token (a file, ztunnel's `AUTH_TOKEN`); the tokens file maps node -> token.
- The identity asked for is the one spiffe:// URI SAN of the CSR. Istio's ztunnel (shared
  mode) also names it in the request metadata, `ImpersonatedIdentity`; when present, the two
  must agree.
- As istiod's node authorizer: a node's ztunnel may act only for identities that have a pod on
  its node. Which pods run where comes from the mesh config (re-read when it changes).
- Answers: the PEM chain, leaf first and root last; UNAUTHENTICATED without a known token;
  PERMISSION_DENIED for an identity the caller may not act for (istiod answers UNAUTHENTICATED
  there; ztunnel treats both alike); INVALID_ARGUMENT for a CSR that does not verify or parse.
  A bad request fails that call only; the service keeps serving.

    python -m testbed.mesh.ca_service --listen IP:PORT --root DIR --mesh-config FILE \\
        --tokens FILE

`CaServicePlan` is the hook a mode calls: it writes the tokens, gives the argv to start in the
control-plane namespace, waits until the port accepts, and gives each node's ztunnel its
environment (`CA_ADDRESS`, `CA_ROOT_CA`, `AUTH_TOKEN`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import grpc

from testbed.mesh import ca_proto
from testbed.mesh.ca import (
    CA_CERT_FILE,
    WORKLOAD_TTL,
    CertificateAuthority,
    CsrError,
    Identity,
    parse_csr,
)
from testbed.mesh.config import ConfigError, ConfigWatcher, LocalConfig
from testbed.netlab import ManagedProcess, Netns
from testbed.netlab.errors import TestbedError

log = logging.getLogger(__name__)

CA_PORT = 15012  # istiod's secure gRPC port (xDS and CA)
# The name Istio's ztunnel checks the CA's certificate for by default inside a cluster.
ISTIOD_NAME = "istiod.istio-system.svc"
TOKENS_FILE = "tokens.json"
READY_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


class CaRefusal(TestbedError):
    """A request the CA does not sign: a gRPC status code name and a message for the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------- who may ask for what


def load_tokens(path: Path) -> dict[str, str]:
    """token -> node, from a file `{"nodes": {"<node>": "<token>"}}`."""
    try:
        data = json.loads(path.read_text())
        nodes = data["nodes"]
        if not isinstance(nodes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in nodes.items()
        ):
            raise TypeError
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f'{path}: expected JSON {{"nodes": {{"<node>": "<token>"}}}} with non-empty tokens'
        ) from None
    return {token: node for node, token in nodes.items()}


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip() or None
    return None


def identities_on_node(config: LocalConfig, node: str) -> set[Identity]:
    return {w.identity for w in config.workloads if w.node == node}


class CertificateService:
    """The CA's decisions, without gRPC: a request in, a PEM chain or a CaRefusal out."""

    def __init__(self, ca: CertificateAuthority, tokens: dict[str, str], config: LocalConfig):
        self.ca = ca
        self.tokens = tokens
        self.config = config  # replaced whole when the mesh config changes

    def create_certificate(
        self, token: str | None, csr: str, validity_s: int, impersonated: str | None
    ) -> list[str]:
        if token is None:
            raise CaRefusal("UNAUTHENTICATED", "no bearer token in the authorization metadata")
        node = self.tokens.get(token)
        if node is None:
            raise CaRefusal("UNAUTHENTICATED", "unknown bearer token")
        try:
            request = parse_csr(csr)
        except CsrError as e:
            raise CaRefusal("INVALID_ARGUMENT", f"bad CSR: {e}") from None
        wanted = request.identity
        if impersonated and impersonated != wanted.uri:
            raise CaRefusal(
                "INVALID_ARGUMENT",
                f"{ca_proto.IMPERSONATED_IDENTITY} {impersonated} differs from the CSR's "
                f"URI SAN {wanted.uri}",
            )
        if wanted.trust_domain != self.ca.trust_domain:
            raise CaRefusal(
                "PERMISSION_DENIED",
                f"{wanted.uri} is not in trust domain {self.ca.trust_domain!r}",
            )
        if wanted not in identities_on_node(self.config, node):
            raise CaRefusal(
                "PERMISSION_DENIED",
                f"node {node}'s ztunnel may not act for {wanted.uri}: no pod on {node} has it",
            )
        ttl = timedelta(seconds=validity_s) if validity_s > 0 else WORKLOAD_TTL
        try:
            chain = self.ca.sign_csr(request, ttl)
        except CsrError as e:
            raise CaRefusal("INVALID_ARGUMENT", str(e)) from None
        log.info("issued %s for node %s (ttl %s)", wanted.uri, node, ttl)
        return chain


# ---------------------------------------------------------------- gRPC


def _handler(service: CertificateService) -> Any:
    def create_certificate(request: Any, context: grpc.ServicerContext) -> Any:
        fields = request.metadata.fields
        impersonated = None
        if ca_proto.IMPERSONATED_IDENTITY in fields:
            impersonated = fields[ca_proto.IMPERSONATED_IDENTITY].string_value
        try:
            chain = service.create_certificate(
                bearer_token(context.invocation_metadata()),
                request.csr,
                request.validity_duration,
                impersonated,
            )
        except CaRefusal as refusal:
            log.warning("refused (%s): %s", refusal.code, refusal.message)
            context.abort(getattr(grpc.StatusCode, refusal.code), refusal.message)
        return ca_proto.IstioCertificateResponse(cert_chain=chain)

    method = grpc.unary_unary_rpc_method_handler(
        create_certificate,
        request_deserializer=ca_proto.IstioCertificateRequest.FromString,
        response_serializer=ca_proto.IstioCertificateResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(
        ca_proto.SERVICE, {ca_proto.CREATE_CERTIFICATE: method}
    )


def server_ips(host: str) -> list[IPv4Address | IPv6Address]:
    """The IP SANs for a listen address: the address itself, loopback for a wildcard."""
    ip = ip_address(host)
    return [ip_address("127.0.0.1")] if ip.is_unspecified else [ip]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


def serve(
    service: CertificateService,
    host: str,
    port: int,
    dns_names: Sequence[str] = (ISTIOD_NAME,),
) -> RunningServer:
    """Start serving on host:port (0: any free port) with a TLS certificate from the root."""
    cert_pem, key_pem = service.ca.issue_server_cert(list(dns_names), server_ips(host))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handler(service),))
    credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    bound = server.add_secure_port(f"{_bracket(host)}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return RunningServer(server, bound)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---------------------------------------------------------------- the hook for a mode


@dataclass(frozen=True)
class CaServicePlan:
    """Everything to run the CA service for one testbed and point ztunnels at it.

    A mode calls `prepare` once (the folder is the run's, recorded in its manifest), starts
    `argv` in the control-plane namespace, calls `await_ready`, and passes
    `ztunnel_env(node)` to each node's Istio ztunnel.
    """

    folder: Path
    host: str
    port: int
    mesh_config: Path
    token_files: dict[str, Path]

    @classmethod
    def prepare(
        cls,
        folder: Path,
        ca: CertificateAuthority,
        mesh_config: Path,
        nodes: Iterable[str],
        host: str,
        port: int = CA_PORT,
    ) -> CaServicePlan:
        """Save the root and write one token per node (files 0600) under `folder`."""
        ca.save(folder / "root")
        tokens = {node: secrets.token_urlsafe(32) for node in nodes}
        token_files = {}
        for node, token in tokens.items():
            token_files[node] = folder / f"token-{node}"
            _write_private(token_files[node], token)
        _write_private(folder / TOKENS_FILE, json.dumps({"nodes": tokens}, indent=2))
        return cls(folder, host, port, mesh_config, token_files)

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "testbed.mesh.ca_service",
            "--listen", f"{_bracket(self.host)}:{self.port}",
            "--root", str(self.folder / "root"),
            "--mesh-config", str(self.mesh_config),
            "--tokens", str(self.folder / TOKENS_FILE),
        ]  # fmt: skip

    @property
    def address(self) -> str:
        return f"https://{_bracket(self.host)}:{self.port}"

    @property
    def root_cert(self) -> Path:
        return self.folder / "root" / CA_CERT_FILE

    def ztunnel_env(self, node: str) -> dict[str, str]:
        """What Istio's ztunnel on `node` needs to get its workloads' certificates here."""
        return {
            "CA_ADDRESS": self.address,
            "CA_ROOT_CA": str(self.root_cert),
            "AUTH_TOKEN": str(self.token_files[node]),
        }

    def await_ready(
        self, netns: Netns, process: ManagedProcess, timeout: float = READY_TIMEOUT
    ) -> None:
        """Until the port accepts connections in `netns` (raises if the process exits)."""
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the CA service exited: {process.output()[-2000:]}")
            try:
                with netns.entered():
                    sock = socket.create_connection((self.host, self.port), timeout=1.0)
                sock.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the CA service is not listening on {self.host}:{self.port} "
                        f"after {timeout} s"
                    ) from None
            time.sleep(POLL_INTERVAL)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- command line


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ip_address(host)
        number = int(port)
        if not sep or not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected IP:PORT (e.g. 10.244.1.5:{CA_PORT}), got {value!r}"
        ) from None
    return host, number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.mesh.ca_service",
        description="Istio's CA protocol (IstioCertificateService) signed by the testbed root.",
    )
    parser.add_argument("--listen", type=_listen, required=True, help="IP:PORT (port 0: any)")
    parser.add_argument(
        "--root", type=Path, required=True, help=f"folder with the root ({CA_CERT_FILE}, key)"
    )
    parser.add_argument(
        "--mesh-config", type=Path, required=True, help="mesh config: which pods run where"
    )
    parser.add_argument(
        "--tokens", type=Path, required=True, help='JSON {"nodes": {"<node>": "<token>"}}'
    )
    parser.add_argument(
        "--dns-name",
        action="append",
        default=None,
        help=f"a DNS SAN of the server certificate (repeatable; default {ISTIOD_NAME})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ca_service %(message)s")
    host, port = args.listen
    try:
        ca = CertificateAuthority.load(args.root)
    except (OSError, ValueError) as e:
        print(f"ca_service: cannot load the root from {args.root}: {e}", file=sys.stderr)
        return 2
    try:
        service = CertificateService(
            ca, load_tokens(args.tokens), LocalConfig.load(args.mesh_config)
        )
    except ConfigError as e:
        print(f"ca_service: {e}", file=sys.stderr)
        return 2

    def on_change(config: LocalConfig) -> None:
        service.config = config

    watcher = ConfigWatcher(args.mesh_config, on_change).start()
    try:
        running = serve(service, host, port, args.dns_name or [ISTIOD_NAME])
    except (OSError, RuntimeError) as e:
        print(f"ca_service: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"ca_service: serving {ca_proto.SERVICE} on {host}:{running.port}", flush=True)
    stop.wait()
    running.stop()
    watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
