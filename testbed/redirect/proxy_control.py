"""What the modes that run their own proxy processes share (sidecar, and legacy and ebpf
through testbed.redirect.ztunnel_fleet): the control plane's files, waiting for a proxy to
answer ready, and for every proxy to load a config."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.mesh.ztunnel import ADMIN_PORT, READY_PORT
from testbed.mesh.ztunnel.state import config_digest
from testbed.netlab import Lab, ManagedProcess
from testbed.redirect.control import ControlPlane
from testbed.redirect.inpod import http_get

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

START_TIMEOUT = 15.0
CONFIG_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


class ProxyError(RuntimeError):
    """A proxy exited, did not come up, or did not take a config in time."""


def lab_of(cluster: Cluster) -> Lab:
    if cluster.lab is None:
        raise ProxyError("a mode installs into a started cluster")
    return cluster.lab


def start_control_plane(cluster: Cluster, trust_domain: str) -> tuple[ControlPlane, Path]:
    """The mesh folder of the run with the config of the cluster's topology written."""
    lab = lab_of(cluster)
    folder = lab.add_dir(cluster.workdir / "mesh")
    control = ControlPlane(folder, trust_domain)
    lab.add_file(control.config_path)
    control.write_config(cluster.topology)
    return control, folder


def await_ready(pod: Pod, process: ManagedProcess, timeout: float = START_TIMEOUT) -> None:
    """Until the proxy in `pod` answers /healthz/ready with 200."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ProxyError(f"{process.label} in {pod.name} exited: {process.output()[-2000:]}")
        try:
            if http_get(pod, READY_PORT, "/healthz/ready")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ProxyError(f"{process.label} in {pod.name} not ready after {timeout} s")
        time.sleep(POLL_INTERVAL)


def config_dump(pod: Pod) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(http_get(pod, ADMIN_PORT, "/config_dump")[1])
    return data


def push_config(
    control: ControlPlane,
    topology: Topology,
    unenrolled: Iterable[str],
    proxies: Iterable[Pod],
    timeout: float = CONFIG_TIMEOUT,
) -> None:
    """Write the mesh config; returns once every proxy (in its pod) has loaded it."""
    digest = config_digest(control.write_config(topology, set(unenrolled)))
    deadline = time.monotonic() + timeout
    for pod in proxies:
        while config_dump(pod)["configDigest"] != digest:
            if time.monotonic() > deadline:
                raise ProxyError(f"the proxy in {pod.name} did not load the new config")
            time.sleep(POLL_INTERVAL)
