"""Istio's own ztunnel (the Rust binary from istio/ztunnel) as a node's ztunnel in inpod mode.

The binary is the user's, built with upstream's own instructions; the inpod option
`ztunnel=PATH` (every node) or `ztunnel=node1:PATH[,node2:PATH]` (a mixed fleet) names it.
It runs in the node's ztunnel pod with the environment of its src/config.rs: the mesh config
as its local config (LOCAL_XDS_PATH, XDS_ADDRESS empty: no istiod), NODE_NAME, INPOD_UDS (our
CNI agent's ZDS socket), PROXY_MODE=shared, its own identity (POD_NAME, POD_NAMESPACE,
SERVICE_ACCOUNT, TRUST_DOMAIN), and the CA service's address, root and token
(testbed.mesh.ca_service, one per testbed in the istiod pod).

Istio's ztunnel reads its local config once, at start: a config push restarts it (the CNI
agent replays its pods on the new connection).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from testbed.netlab.features import Feature

ENV_VARIABLE = "TESTBED_ZTUNNEL"  # the tests' and doctor's way to find a binary
VERSION_TIMEOUT = 10.0


def parse_ztunnel_option(value: str) -> dict[str | None, Path]:
    """`PATH` -> {None: PATH} (every node); `node1:PATH,node2:PATH` -> {node: PATH}.

    Raises ValueError naming the value when a path is not an executable file.
    """
    items = [item.strip() for item in value.split(",")]
    pairs = [item.partition(":") for item in items]
    if all(sep and node and "/" not in node for node, sep, _ in pairs):
        chosen: dict[str | None, Path] = {node: Path(path) for node, _, path in pairs}
    else:
        chosen = {None: Path(value)}
    for path in chosen.values():
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ValueError(
                f"{str(path)!r} is not an executable file (expected Istio's ztunnel binary: "
                "PATH or node1:PATH[,node2:PATH])"
            )
    return chosen


def binaries_by_node(value: str | None, nodes: list[str]) -> dict[str, Path]:
    """The nodes that run Istio's ztunnel and its binary; an unknown node is a ValueError."""
    if value is None:
        return {}
    chosen = parse_ztunnel_option(value)
    if None in chosen:
        return dict.fromkeys(nodes, chosen[None])
    unknown = sorted(str(node) for node in chosen if node not in nodes)
    if unknown:
        raise ValueError(f"no node {', '.join(unknown)}; nodes: {', '.join(nodes)}")
    return {str(node): path for node, path in chosen.items()}


def ztunnel_env(
    node: str, *, config: Path, zds_socket: Path, trust_domain: str, ca_env: dict[str, str]
) -> dict[str, str]:
    """The environment Istio's ztunnel on `node` runs with (names from its src/config.rs)."""
    return {
        "LOCAL_XDS_PATH": str(config),
        "XDS_ADDRESS": "",  # no istiod: the local file is the whole config
        "NODE_NAME": node,
        "INPOD_UDS": str(zds_socket),
        "PROXY_MODE": "shared",
        "POD_NAME": f"ztunnel-{node}",
        "POD_NAMESPACE": "istio-system",
        "SERVICE_ACCOUNT": "ztunnel",
        "TRUST_DOMAIN": trust_domain,
        "RUST_LOG": "info",
        **ca_env,
    }


def version_line(binary: str | None = None) -> tuple[bool, str]:
    """For doctor: whether TESTBED_ZTUNNEL names a binary, and its `ztunnel version` line."""
    binary = binary if binary is not None else os.environ.get(ENV_VARIABLE, "")
    if not binary:
        return False, f"{ENV_VARIABLE} unset (Istio's ztunnel tests skip; -o ztunnel=PATH)"
    try:
        done = subprocess.run(
            [binary, "version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{ENV_VARIABLE}={binary}: cannot run `version`: {e}"
    line = (done.stdout.strip().splitlines() or ["(no output)"])[0]
    return done.returncode == 0, f"{ENV_VARIABLE}={binary}: {line}"


def detect_istio_ztunnel() -> Feature:
    """The doctor row: TESTBED_ZTUNNEL and the binary's version (optional: tests skip)."""
    ok, detail = version_line()
    return Feature("istio-ztunnel", ok, detail, "inpod -o ztunnel=PATH, Istio ztunnel tests")
