"""The workload certificates a ztunnel holds: one key pair per identity, in folders.

The control plane writes `<root>/<namespace>/<service account>/{cert-chain,key,root-cert}.pem`
(Istio's file names) for each identity with a pod on the node; TLS contexts are built on
first use and kept, since building one reads and parses files.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from testbed.mesh.ca import CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, Identity
from testbed.mesh.hbone import client_context, server_context
from testbed.netlab.errors import TestbedError


def identity_dir(root: Path, identity: Identity) -> Path:
    return root / identity.namespace / identity.service_account


class MissingCertificateError(TestbedError, LookupError):
    """This ztunnel holds no certificate for the identity."""


class CertStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._server: dict[Identity, ssl.SSLContext] = {}
        self._client: dict[Identity, ssl.SSLContext] = {}

    def _files(self, identity: Identity) -> tuple[Path, Path, Path]:
        folder = identity_dir(self.root, identity)
        files = (folder / CERT_CHAIN_FILE, folder / KEY_FILE, folder / ROOT_CERT_FILE)
        if not all(f.is_file() for f in files):
            raise MissingCertificateError(f"no certificate for {identity} in {folder}")
        return files

    def server_context(self, identity: Identity) -> ssl.SSLContext:
        context = self._server.get(identity)
        if context is None:
            context = self._server[identity] = server_context(*self._files(identity))
        return context

    def client_context(self, identity: Identity) -> ssl.SSLContext:
        context = self._client.get(identity)
        if context is None:
            context = self._client[identity] = client_context(*self._files(identity))
        return context

    def identities(self) -> list[str]:
        """The identities this ztunnel holds certificates for (for /config_dump)."""
        return sorted(
            f"{ns.name}/{sa.name}"
            for ns in self.root.glob("*")
            if ns.is_dir()
            for sa in ns.glob("*")
            if (sa / CERT_CHAIN_FILE).is_file()
        )
