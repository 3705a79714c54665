"""The running cluster: build, inventory, pod handles, connectivity checks, teardown.

with Cluster(load_topology("two_nodes"), create_mode("none")) as c:
    c.ping_all()

The mode is an object the caller makes (testbed.redirect.create_mode), as Mininet is given
its node classes: the cluster builds the network and calls the mode, never the other way.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Generic, TypeVar

from typing_extensions import Unpack

from testbed.cluster import build, clusterdns
from testbed.cluster.apps import RunningApp, app_state, start_apps
from testbed.cluster.kubeproxy import render_service_rules
from testbed.cluster.loader import load_topology
from testbed.cluster.mode import RedirectMode
from testbed.cluster.model import (
    NodeSpec,
    PodSpec,
    ServiceSpec,
    Topology,
    TopologyError,
    place_pod,
    plan,
    service_endpoints,
)
from testbed.netlab import Lab, ManagedProcess, Netns
from testbed.netlab.host import RunOptions, SpawnOptions
from testbed.netlab.interrupt import raise_if_requested
from testbed.netlab.manifest import RUNS_ROOT, check_run_name
from testbed.netlab.process import NetlabError

INVENTORY = "inventory.json"
PLACEMENTS = ("same-node", "cross-node")


SpecT = TypeVar("SpecT", NodeSpec, PodSpec)


class _Built(Generic[SpecT]):
    """What the cluster built for a declaration: the spec and the namespace made for it."""

    def __init__(self, spec: SpecT, netns: Netns) -> None:
        self.spec: SpecT = spec
        self.netns = netns
        self.name = spec.name


class Node(_Built[NodeSpec]):
    def __init__(self, spec: NodeSpec, netns: Netns) -> None:
        super().__init__(spec, netns)
        self.underlay_ip = spec.underlay_ip
        self.pod_count = 0


class Pod(_Built[PodSpec]):
    """A pod: a namespace with one veth to its node. Runs commands inside itself."""

    def __init__(self, spec: PodSpec, netns: Netns) -> None:
        super().__init__(spec, netns)
        self.ip = spec.ip
        self.node = spec.node
        self.namespace = spec.namespace
        self.service_account = spec.service_account
        self.labels = spec.labels

    def __repr__(self) -> str:
        return f"Pod({self.name} {self.ip} on {self.node})"

    def run(
        self, argv: Sequence[str], **options: Unpack[RunOptions]
    ) -> subprocess.CompletedProcess[str]:
        return self.netns.run(in_pod(self.netns.name, argv), **options)

    def spawn(
        self, argv: Sequence[str], *, label: str, **options: Unpack[SpawnOptions]
    ) -> ManagedProcess:
        return self.netns.spawn(
            in_pod(self.netns.name, argv), label=f"{self.name}-{label}", **options
        )


def in_pod(netns: str, argv: Sequence[str]) -> list[str]:
    """`argv` as run in the pod: `ip netns exec` gives it the pod's own /etc/resolv.conf."""
    return ["ip", "netns", "exec", netns, *argv]


class Cluster:
    """A topology built out of namespaces, with a redirection mode installed."""

    def __init__(
        self,
        topology: Topology | str,
        mode: RedirectMode,
        *,
        name: str | None = None,
        root: Path = RUNS_ROOT,
    ) -> None:
        self.topology = load_topology(topology) if isinstance(topology, str) else topology
        self.run = check_run_name(name) if name else secrets.token_hex(3)
        self.mode = mode
        self.root = root
        self.lab: Lab | None = None
        self.fabric: Netns | None = None
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self.services: dict[str, ServiceSpec] = {}
        self.system_pods: dict[str, Pod] = {}
        self.apps: list[RunningApp] = []

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Validate everything first, then build; on any failure or Ctrl-C, tear down."""
        plan(self.topology)
        self.services = dict(self.topology.services)
        self.lab = Lab.create(self.run, self.root)
        try:
            self._build()
            self.mode.install(self)
            self.apps = start_apps(self._lab, list(self.pods.values()))  # after in-pod rules
            raise_if_requested()  # a Ctrl-C that landed in a finalizer is not lost
            self.save_inventory()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.lab is not None:
            self.lab.teardown()  # the apps are the lab's processes: stopped with the rest
            self.lab = None
            self.apps = []

    @property
    def workdir(self) -> Path:
        return self._lab.workdir

    @property
    def _lab(self) -> Lab:
        if self.lab is None:
            raise RuntimeError("the cluster is not running")
        return self.lab

    def _build(self) -> None:
        from testbed.netlab.features import detect_netem

        lab = self._lab
        specs = list(self.topology.nodes.values())
        netem = detect_netem(lab) if any(n.link.delay or n.link.loss for n in specs) else True
        self.fabric = build.build_fabric(lab, self.topology.bridges, self.topology.bridge_links)
        for spec in specs:
            others = [o for o in specs if o is not spec]
            ns = build.build_node(lab, spec, self.fabric, others, netem)
            self.nodes[spec.name] = Node(spec, ns)
        for pod_spec in self.topology.pods.values():
            self.pods[pod_spec.name] = self._build_pod(pod_spec)
        first_node = specs[0].name
        clusterdns.start_cluster_dns(self, first_node)
        self._install_kube_proxy()

    def _build_pod(self, spec: PodSpec) -> Pod:
        node = self.nodes[spec.node]
        node.pod_count += 1
        netns = build.build_pod(self._lab, node.spec, node.netns, spec, clusterdns.DNS_SERVICE_VIP)
        return Pod(spec, netns)

    def _install_kube_proxy(self) -> None:
        rules = render_service_rules(
            ((svc, service_endpoints(self.topology, svc)) for svc in self.services.values()),
            dns=(clusterdns.DNS_SERVICE_VIP, self.pod(clusterdns.DNS_POD).ip),
        )
        for node in self.nodes.values():
            node.netns.run(["iptables-restore", "--noflush"], input=rules)

    def add_system_pod(
        self,
        node: str,
        name: str,
        *,
        namespace: str,
        service_account: str,
        labels: dict[str, str] | None = None,
    ) -> Pod:
        """A pod the mode needs (a ztunnel, a waypoint), on the node's pod CIDR."""
        target = self.nodes[node]
        spec = PodSpec(name, node, namespace, service_account, dict(labels or {}))
        place_pod(target.spec, spec, target.pod_count)
        pod = self._build_pod(spec)
        self.system_pods[name] = pod
        return pod

    # -- lookups -----------------------------------------------------------------------
    def pod(self, name: str) -> Pod:
        found = self.pods.get(name) or self.system_pods.get(name)
        if found is None:
            raise TopologyError(f"no pod named {name!r}; pods: {', '.join(self.pods)}")
        return found

    def pair(self, placement: str) -> tuple[Pod, Pod]:
        """A client pod and a server pod on the same node or on different nodes."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}: expected one of {PLACEMENTS}")
        clients = [p for p in self.pods.values() if p.labels.get("role") == "client"]
        servers = [p for p in self.pods.values() if p.labels.get("role") == "server"]
        for client in clients:
            for server in servers:
                if (server.node == client.node) == (placement == "same-node"):
                    return client, server
        raise TopologyError(
            f"topology {self.topology.name} has no role=client/role=server pods {placement}"
        )

    def resolve(self, text: str) -> str:
        """A pod name becomes its IP (as in Mininet's CLI); anything else is kept."""
        pod = self.pods.get(text) or self.system_pods.get(text)
        return pod.ip if pod else text

    def resolve_host(self, text: str) -> str:
        """A service name becomes its VIP (a name both a service and a pod means the service,
        as DNS would have it), a pod name its IP; anything else is kept."""
        service = self.services.get(text)
        return service.vip if service else self.resolve(text)

    def app_states(self) -> list[dict[str, Any]]:
        """Each declared app with its state now (see testbed.cluster.apps.app_state)."""
        for app in self.apps:
            app.process.poll()  # reap an app that ended, so it is not taken for running
        return [app_state(app.record()) for app in self.apps]

    def proxy_pids(self) -> dict[str, int]:
        return self.mode.proxy_pids()

    def facts(self) -> dict[str, str]:
        return {"mode": self.mode.name, **self.mode.facts()}

    # -- checks ------------------------------------------------------------------------
    def ping(self, src: str, dst: str, count: int = 1) -> bool:
        done = self.pod(src).run(
            ["ping", "-c", str(count), "-W", "1", "-i", "0.2", self.resolve(dst)], check=False
        )
        return done.returncode == 0

    def ping_all(self, workers: int = 8) -> list[tuple[str, str]]:
        """Ping every pod from every pod; returns the pairs that failed."""
        pairs = [(a, b) for a in self.pods for b in self.pods if a != b]
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda ab: self.ping(*ab), pairs))
        return [pair for pair, ok in zip(pairs, results, strict=True) if not ok]

    def tcp_all(self, port: int = 7777, timeout: float = 2.0) -> list[tuple[str, str]]:
        """Open a TCP connection from every pod to every other pod; returns failed pairs.

        Listeners and clients are sockets created inside the pods' namespaces by this
        process, so the check runs hundreds of connections without starting programs.
        """
        listeners = {}
        for pod in self.pods.values():
            with pod.netns.entered():
                listeners[pod.name] = socket.create_server((pod.ip, port), backlog=1024)
        failed = []
        try:
            for src in self.pods.values():
                with src.netns.entered():
                    for dst in self.pods.values():
                        if dst is not src and not _tcp_reaches(dst.ip, port, timeout):
                            failed.append((src.name, dst.name))
        finally:
            for sock in listeners.values():
                sock.close()
        return failed

    # -- inventory ---------------------------------------------------------------------
    def inventory(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "topology": self.topology.name,
            "params": self.topology.params,
            "facts": self.facts(),
            "fabric": self.fabric.name if self.fabric else None,
            "nodes": [
                {
                    "name": n.name,
                    "netns": n.netns.name,
                    "underlay_ip": n.underlay_ip,
                    "pod_cidr": n.spec.pod_cidr,
                    "link": asdict(n.spec.link),
                }
                for n in self.nodes.values()
            ],
            "pods": [_pod_record(p, system=False) for p in self.pods.values()]
            + [_pod_record(p, system=True) for p in self.system_pods.values()],
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": s.vip,
                    "ports": {str(k): v for k, v in s.ports.items()},
                    "selector": s.selector,
                    "endpoints": [p.name for p in service_endpoints(self.topology, s)],
                }
                for s in self.services.values()
            ],
            "proxies": self.proxy_pids(),
            "apps": self.app_states(),
        }

    def save_inventory(self) -> None:
        path = self._lab.manifest.state_file(INVENTORY)
        path.write_text(json.dumps(self.inventory(), indent=2), encoding="utf-8")


def _pod_record(pod: Pod, *, system: bool) -> dict[str, Any]:
    return {
        "name": pod.name,
        "node": pod.node,
        "namespace": pod.namespace,
        "service_account": pod.service_account,
        "ip": pod.ip,
        "labels": pod.labels,
        "netns": pod.netns.name,
        "system": system,
    }


def _tcp_reaches(ip: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_inventory(run: str, root: Path = RUNS_ROOT) -> dict[str, Any]:
    path = root / check_run_name(run) / INVENTORY
    if not path.exists():
        raise NetlabError(f"no running testbed named {run!r} (no {path})")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    data["apps"] = [app_state(record) for record in data.get("apps", [])]  # as they are now
    return data
