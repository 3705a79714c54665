"""One lifecycle for every redirection mode (the RedirectMode protocol of testbed.cluster.mode).

`Mode` is what every mode shares: typed options (a pydantic model per mode; a bad option is
one ModeError naming it and what was expected), the install order, and enrolling and
unenrolling in the order that keeps other pods' connections alive, with the bookkeeping of
captured pods taken out of the mesh. A mode says how traffic is steered (`capture`,
`release`, `describe_capture`).

`MeshMode` adds what every mode with proxies shares: the control plane's files (mesh config,
certificates, waypoint L7 files), starting each proxy and waiting for /healthz/ready, pushing
a new config and waiting until every proxy runs it, and the waypoints, which a mode that
Istio ran them with starts (`runs_waypoints`). `NodeZtunnelMode` is a mesh mode with a
ztunnel per node in its own pod (istio-system/ztunnel); a mode adds its node plumbing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from testbed.cluster.mode import ModeError
from testbed.cluster.waypoints import WaypointSpec
from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN
from testbed.mesh.ztunnel import ADMIN_PORT, READY_PORT
from testbed.mesh.ztunnel.state import config_digest
from testbed.netlab import Lab, ManagedProcess
from testbed.netlab.errors import TestbedError
from testbed.netlab.http import http_get as netns_http_get
from testbed.redirect.control import ControlPlane, is_captured

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

START_TIMEOUT = 15.0
CONFIG_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
ZTUNNEL_NAMESPACE = "istio-system"
ZTUNNEL_ACCOUNT = "ztunnel"


class ProxyError(TestbedError, RuntimeError):
    """A proxy exited, did not come up, or did not take a config in time."""


# ---------------------------------------------------------------- options


class ModeOptions(BaseModel):
    """A mode's options: one typed field per option, defaulting to the mode's default."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    def facts(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump().items()}


class MeshOptions(ModeOptions):
    trust_domain: str = DEFAULT_TRUST_DOMAIN


class SharedZtunnelOptions(MeshOptions):
    """Modes whose node ztunnel serves its pods from its own namespace (legacy, ebpf)."""

    # Istio 1.20's shared ztunnel served a destination of its own node in-process (no TLS,
    # no HBONE), unconditionally; off sends it over HBONE to the ztunnel's own 15008.
    same_node_fast_path: bool = True


OptionsT = TypeVar("OptionsT", bound=ModeOptions)


def parse_options(mode: str, model: type[OptionsT], raw: Mapping[str, Any]) -> OptionsT:
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(_problem(model, error) for error in exc.errors())
        raise ModeError(f"mode {mode}: {problems}") from None


def _problem(model: type[ModeOptions], error: ErrorDetails) -> str:
    option = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"unknown option {option!r}; " + (
            f"expected one of {known}" if known else "it takes no options"
        )
    message = error["msg"].removeprefix("Value error, ")  # a validator's own message
    expected = message.removeprefix("Input should be ")
    problem = f"expected {expected}" if expected != message else message
    return f"option {option} {error['input']!r}: {problem}"


# ---------------------------------------------------------------- proxies


def http_get(pod: Pod, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:<port><path> inside `pod`'s namespace: (status, body)."""
    return netns_http_get(pod.netns, port, path, timeout=timeout)


@dataclass
class Proxy:
    """A proxy process of the mode in its pod, restartable with the same command."""

    pod: Pod
    argv: list[str]
    kind: str  # ztunnel, sidecar, waypoint: the process's label in its pod
    process: ManagedProcess
    reads_mesh_config: bool = True  # serves the digest of the config it runs on /config_dump
    companions: list[ManagedProcess] = field(default_factory=list)  # must stay up with it
    env: dict[str, str] | None = None  # extra environment (Istio's ztunnel is set up by it)

    def check_running(self) -> None:
        for process in (self.process, *self.companions):
            if process.poll() is not None:
                output = process.output()[-2000:]
                raise ProxyError(f"{process.label} for {self.pod.name} exited: {output}")

    def ready(self) -> bool:
        try:
            return http_get(self.pod, READY_PORT, "/healthz/ready")[0] == 200
        except OSError:
            return False

    def config_dump(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(http_get(self.pod, ADMIN_PORT, "/config_dump")[1])
        return data


# ---------------------------------------------------------------- every mode


class Mode:
    """A redirection mode; subclasses say how traffic is steered and what runs."""

    name: ClassVar[str]
    Options: ClassVar[type[ModeOptions]] = ModeOptions
    variant_option: ClassVar[str | None] = None  # an option whose every value is a variant
    runs_waypoints: ClassVar[bool] = False  # Istio ran waypoints with it (L7 in waypoints)
    l7_in_sidecars: ClassVar[bool] = False  # its per-pod proxies do L7 themselves (no waypoint)
    captures_dns: ClassVar[bool] = False  # pods' DNS goes to their proxy's 15053 (else kube-dns)
    options: ModeOptions

    def __init__(self, options: ModeOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self.enrolled: set[str] = set()
        self.unenrolled: set[str] = set()  # captured by their labels, taken out since
        self._cluster: Cluster | None = None

    @classmethod
    def from_options(cls, raw: Mapping[str, Any]) -> Self:
        return cls(parse_options(cls.name, cls.Options, raw))

    @classmethod
    def variants(cls) -> dict[str, dict[str, str]]:
        """Name -> options of each variant: the mode itself, or one per value of its
        `variant_option` (inpod-redirect, inpod-tproxy, ...)."""
        if cls.variant_option is None:
            return {cls.name: {}}
        values = get_args(cls.Options.model_fields[cls.variant_option].annotation)
        return {f"{cls.name}-{value}": {cls.variant_option: value} for value in values}

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            raise RuntimeError(f"mode {self.name} is not installed")
        return self._cluster

    @property
    def lab(self) -> Lab:
        if self.cluster.lab is None:
            raise RuntimeError(f"mode {self.name} installs into a started cluster")
        return self.cluster.lab

    # -- what a mode adds -------------------------------------------------------------------
    def start(self, cluster: Cluster) -> None:
        """After the network is built, before any pod is enrolled: plumbing and proxies."""

    def capture(self, pod: Pod) -> None:
        """Steer a pod's traffic to its proxy."""

    def release(self, pod: Pod) -> None:
        """Stop steering a pod's traffic."""

    def describe_capture(self, pod: Pod) -> str:
        """What steers an enrolled pod's traffic, for the shell and inspect."""
        return f"{pod.name}: captured"

    def found_facts(self) -> dict[str, str]:
        """What installing found out beyond the options (a fallback taken, and why)."""
        return {}

    def push_config(self, topology: Topology | None = None) -> None:
        """Tell the proxies about the topology's current state (no proxies: nothing)."""

    # -- the lifecycle ----------------------------------------------------------------------
    def install(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.start(cluster)
        for pod in cluster.pods.values():
            self.enroll(pod)

    def enroll(self, pod: Pod) -> None:
        """Captured; announced in the mesh again if it was taken out before."""
        if not is_captured(pod.spec) or pod.name in self.enrolled:
            return
        self.capture(pod)
        self.enrolled.add(pod.name)
        if pod.name in self.unenrolled:
            self.unenrolled.discard(pod.name)
            self.push_config()

    def unenroll(self, pod: Pod) -> None:
        """Out of the mesh first (peers stop sending it HBONE), then no longer captured."""
        if pod.name not in self.enrolled:
            return
        self.unenrolled.add(pod.name)
        self.push_config()
        self.release(pod)
        self.enrolled.discard(pod.name)

    def update_policies(self, topology: Topology | None = None) -> None:
        """Push the topology's current policies; returns once every proxy runs with them."""
        self.push_config(topology)

    def facts(self) -> dict[str, str]:
        return self.options.facts() | self.found_facts()

    def proxy_pids(self) -> dict[str, int]:
        return {}

    def describe_pod(self, pod: Pod) -> str:
        if not is_captured(pod.spec):
            return f"{pod.name}: not captured (istio.io/dataplane-mode=none)"
        if pod.name not in self.enrolled:
            return f"{pod.name}: not captured (unenrolled)"
        return self.describe_capture(pod)


# ---------------------------------------------------------------- modes with proxies


class MeshMode(Mode):
    """A mode whose proxies read the control plane's files."""

    Options = MeshOptions
    options: MeshOptions

    def __init__(self, options: ModeOptions | None = None) -> None:
        super().__init__(options)
        self.control: ControlPlane | None = None
        self.proxies: dict[str, Proxy] = {}  # by label: ztunnel-node1, sidecar-client, ...

    @property
    def trust_domain(self) -> str:
        return self.options.trust_domain

    @property
    def mesh(self) -> ControlPlane:
        if self.control is None:
            raise RuntimeError(f"mode {self.name} is not installed")
        return self.control

    def start_proxies(self, cluster: Cluster) -> None:
        """The mode's plumbing and proxies (`start_proxy`); the base waits for them."""

    def start(self, cluster: Cluster) -> None:
        folder = self.lab.add_dir(cluster.workdir / "mesh")
        self.control = ControlPlane(folder, self.trust_domain)
        for path in self.control.files(cluster.topology):
            self.lab.add_file(path)
        self.control.write_config(cluster.topology)
        self.start_proxies(cluster)
        self.await_ready(self.proxies.values())
        if self.runs_waypoints:
            self.start_waypoints()

    # -- proxies ----------------------------------------------------------------------------
    def proxy_argv(self, module: str, certs: Path, node: str, *extra: str) -> list[str]:
        """A ztunnel-shaped proxy: it reads the mesh config and its node's certificates."""
        config = str(self.mesh.config_path)
        return [sys.executable, "-m", module, "--config", config, "--certs", str(certs),
                "--node", node, *extra]  # fmt: skip

    def start_proxy(
        self,
        label: str,
        pod: Pod,
        argv: list[str],
        *,
        kind: str,
        reads_mesh_config: bool = True,
        companions: Sequence[ManagedProcess] = (),
        env: dict[str, str] | None = None,
    ) -> Proxy:
        process = pod.spawn(argv, label=kind, env=env)
        proxy = Proxy(pod, argv, kind, process, reads_mesh_config, list(companions), env)
        self.proxies[label] = proxy
        return proxy

    def stop_proxy(self, label: str) -> None:
        proxy = self.proxies.pop(label, None)
        if proxy is not None:
            proxy.process.terminate()

    def restart_proxy(self, label: str) -> None:
        """Kill the proxy and start it again; returns once the new one is ready."""
        proxy = self.proxies[label]
        proxy.process.terminate()
        proxy.process = proxy.pod.spawn(proxy.argv, label=proxy.kind, env=proxy.env)
        self.await_ready([proxy])

    def await_ready(self, proxies: Iterable[Proxy], timeout: float = START_TIMEOUT) -> None:
        """Until every proxy answers /healthz/ready with 200."""
        deadline = time.monotonic() + timeout
        for proxy in list(proxies):
            while not proxy.ready():
                proxy.check_running()
                if time.monotonic() > deadline:
                    raise ProxyError(f"{proxy.process.label} not ready after {timeout} s")
                time.sleep(POLL_INTERVAL)

    def push_config(self, topology: Topology | None = None) -> None:
        """Write the mesh config and the waypoints' L7 files; returns once every proxy that
        reads the mesh config runs this one."""
        config = self.mesh.write_config(topology or self.cluster.topology, self.unenrolled)
        digest = config_digest(config)
        deadline = time.monotonic() + CONFIG_TIMEOUT
        for proxy in [p for p in self.proxies.values() if p.reads_mesh_config]:
            while proxy.config_dump()["configDigest"] != digest:
                if time.monotonic() > deadline:
                    raise ProxyError(f"{proxy.process.label} did not load the new config")
                time.sleep(POLL_INTERVAL)

    def proxy_pids(self) -> dict[str, int]:
        return {
            label: proxy.process.pid
            for label, proxy in self.proxies.items()
            if proxy.process.poll() is None
        }

    # -- waypoints --------------------------------------------------------------------------
    def start_waypoints(self) -> None:
        """A process per declared waypoint, in its pod, with its own certificate."""
        specs = self.cluster.topology.l7.waypoints.values()
        self.await_ready([self._spawn_waypoint(spec) for spec in specs])

    def start_waypoint(self, name: str) -> None:
        self.await_ready([self._spawn_waypoint(self._waypoint_spec(name))])

    def stop_waypoint(self, name: str) -> None:
        self.stop_proxy(f"waypoint-{name}")

    def _waypoint_spec(self, name: str) -> WaypointSpec:
        for spec in self.cluster.topology.l7.waypoints.values():
            if spec.name == name:
                return spec
        raise ModeError(f"mode {self.name}: the topology declares no waypoint {name!r}")

    def _spawn_waypoint(self, spec: WaypointSpec) -> Proxy:
        certs = self.mesh.directory / f"waypoint-{spec.name}-certs"
        if not certs.exists():
            self.mesh.issue_waypoint_certs(spec, self.lab.add_dir(certs))
        argv = [
            sys.executable, "-m", "testbed.mesh.waypoint",
            "--mesh-config", str(self.mesh.config_path),
            "--l7-config", str(self.mesh.waypoint_config_path(spec.name)),
            "--certs", str(certs),
            "--name", f"waypoint-{spec.name}",
        ]  # fmt: skip
        pod = self.cluster.pod(spec.name)
        return self.start_proxy(
            f"waypoint-{spec.name}", pod, argv, kind="waypoint", reads_mesh_config=False
        )


# ---------------------------------------------------------------- a ztunnel per node


class NodeZtunnelMode(MeshMode):
    """A ztunnel per node in its own pod; subclasses say how traffic gets to it."""

    runs_waypoints = True  # inpod, legacy and ebpf: Istio's ambient modes, L7 in waypoints
    ZTUNNEL_MODULE: ClassVar[str] = "testbed.mesh.ztunnel.shared"

    def __init__(self, options: ModeOptions | None = None) -> None:
        super().__init__(options)
        self.ztunnels: dict[str, Proxy] = {}  # by node

    # -- what a mode adds -------------------------------------------------------------------
    def prepare(self, cluster: Cluster) -> None:
        """Once, before any node: what every node's plumbing needs."""

    def install_node(self, cluster: Cluster, node: str, ztunnel: Pod) -> None:
        """The node's plumbing, with its ztunnel pod created but its ztunnel not started."""

    def ztunnel_args(self, node: str, ztunnel: Pod) -> list[str]:
        """How the node's ztunnel reaches its pods; by default (testbed.mesh.ztunnel.shared)
        it serves them from its own namespace, at its own address."""
        options = self.options
        fast_path = isinstance(options, SharedZtunnelOptions) and options.same_node_fast_path
        return ["--ztunnel-ip", ztunnel.ip, "--same-node-fast-path", "on" if fast_path else "off"]

    def ztunnel_companions(self, node: str) -> list[ManagedProcess]:
        """Processes the node's ztunnel needs running (inpod's CNI agent)."""
        return []

    # -- install ----------------------------------------------------------------------------
    def start_proxies(self, cluster: Cluster) -> None:
        self.prepare(cluster)
        for node in cluster.nodes:
            pod = cluster.add_system_pod(
                node,
                f"ztunnel-{node}",
                namespace=ZTUNNEL_NAMESPACE,
                service_account=ZTUNNEL_ACCOUNT,
            )
            self.install_node(cluster, node, pod)
            self.ztunnels[node] = self._start_ztunnel(node, pod)

    def _start_ztunnel(self, node: str, pod: Pod) -> Proxy:
        """The node's certificates, then its ztunnel (not waited for)."""
        certs = self.lab.add_dir(self.mesh.directory / f"ztunnel-{node}")
        self.mesh.issue_node_certs(self.cluster.topology, node, certs)
        argv = self.proxy_argv(self.ZTUNNEL_MODULE, certs, node, *self.ztunnel_args(node, pod))
        companions = self.ztunnel_companions(node)
        return self.start_proxy(f"ztunnel-{node}", pod, argv, kind="ztunnel", companions=companions)

    # -- ztunnels ---------------------------------------------------------------------------
    def config_dump(self, node: str) -> dict[str, Any]:
        return self.ztunnels[node].config_dump()

    def restart_ztunnel(self, node: str) -> None:
        """Kill the node's ztunnel and start a new one; returns once it is ready again."""
        self.restart_proxy(f"ztunnel-{node}")
