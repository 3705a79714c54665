"""Mode `sidecar`: Istio's classic data plane, one proxy per pod (DESIGN.md 4.4).

Each captured pod gets istio-iptables rules (testbed.redirect.sidecar_rules, the proxy's own
sockets exempted by mark 0x539) and its own proxy process inside its namespace: the ztunnel
code serving that one workload (testbed.mesh.ztunnel.sidecar), HBONE between sidecars.

Istio's sidecar (REDIRECT interception) reaches the app from 127.0.0.6; here the proxy
connects from the client's own address, as the ambient modes do, so that every mode shows
the app the same peer. Two testbed additions make that work: the proxy's connections to its
app over lo skip the outbound capture, and the app's replies to them are routed back to the
proxy by connmark 0x111 and the local table 100 (the same policy routing as inpod mode).

Options: `trust_domain` (default cluster.local).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.cluster.waypoints import write_l7_config
from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.netlab import ManagedProcess
from testbed.redirect import inpod_rules, sidecar_rules
from testbed.redirect.control import ControlPlane, is_captured
from testbed.redirect.inpod_rules import CommandRunner, Rule, remove_iptables_chains
from testbed.redirect.proxy_control import (
    await_ready,
    config_dump,
    lab_of,
    push_config,
    start_control_plane,
)

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology

OPTIONS = ("trust_domain",)
RETURN_PRERT, RETURN_OUTPUT = "TB_ORIGSRC_PRERT", "TB_ORIGSRC_OUTPUT"
RETURN_CHAINS = (RETURN_PRERT, RETURN_OUTPUT)
_MARK, _CONNMARK = sidecar_rules.PROXY_MARK, inpod_rules.TPROXY_MARK


def original_source_rules() -> list[Rule]:
    """Let the proxy reach its app from the client's address, and route the replies back."""
    return [
        Rule("mangle", "PREROUTING", f"-j {RETURN_PRERT}"),
        Rule("mangle", "OUTPUT", f"-j {RETURN_OUTPUT}"),
        Rule("mangle", RETURN_PRERT, f"-m mark --mark {_MARK} -j CONNMARK --set-xmark {_CONNMARK}"),
        Rule(
            "mangle",
            RETURN_OUTPUT,
            f"-m connmark --mark {_CONNMARK} -j CONNMARK --restore-mark"
            " --nfmask 0xffffffff --ctmask 0xffffffff",
        ),
    ]


def render_original_source(pod_ip: str) -> str:
    """`iptables-restore --noflush` input: the mangle chains, and the nat exemption put
    first in the sidecar's ISTIO_OUTPUT (ahead of its `-o lo` proxy rule)."""
    script = inpod_rules.restore_script(original_source_rules())
    exemption = f"! -s {pod_ip}/32 -o lo -m mark --mark {_MARK} -j RETURN"
    return script + f"*nat\n-I {sidecar_rules.OUTPUT} 1 {exemption}\nCOMMIT\n"


def install_rules(netns: CommandRunner, pod_ip: str) -> None:
    sidecar_rules.install(netns, "mark")
    remove_iptables_chains(netns, RETURN_CHAINS)
    netns.run(["iptables-restore", "--noflush"], input=render_original_source(pod_ip))
    for command in inpod_rules.policy_routes():
        netns.run(command.argv("add"))


def uninstall_rules(netns: CommandRunner) -> None:
    sidecar_rules.uninstall(netns)
    remove_iptables_chains(netns, RETURN_CHAINS)
    for command in reversed(inpod_rules.policy_routes()):
        netns.run(command.argv("del"), check=False)


class SidecarMode:
    name = "sidecar"

    def __init__(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.trust_domain = trust_domain
        self.control: ControlPlane | None = None
        self.certs: dict[str, Path] = {}  # node -> its certificate folder
        self.l7_path = Path()  # routes and L7 policies for the sidecars, written at install
        self.sidecars: dict[str, tuple[Pod, ManagedProcess]] = {}
        self.unenrolled: set[str] = set()
        self._cluster: Cluster | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SidecarMode:
        from testbed.redirect import ModeError

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ModeError(f"mode sidecar: unknown option(s) {unknown}; expected {OPTIONS}")
        return cls(str(options.get("trust_domain", DEFAULT_TRUST_DOMAIN)))

    def install(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.control, folder = start_control_plane(cluster, self.trust_domain)
        # Every route and L7 policy of the topology; each sidecar applies its destination's.
        self.l7_path = lab_of(cluster).add_file(folder / "sidecar-l7.yaml")
        l7 = cluster.topology.l7
        write_l7_config(self.l7_path, WaypointConfig(routes=l7.routes, policies=l7.policies))
        for node in cluster.nodes:
            self.certs[node] = lab_of(cluster).add_dir(folder / f"sidecars-{node}")
            self.control.issue_node_certs(cluster.topology, node, self.certs[node])
        started = [self._start(pod) for pod in cluster.pods.values() if is_captured(pod.spec)]
        for pod, process in started:
            await_ready(pod, process)

    def _start(self, pod: Pod) -> tuple[Pod, ManagedProcess]:
        assert self.control is not None
        install_rules(pod.netns, pod.ip)
        argv = [
            sys.executable, "-m", "testbed.mesh.ztunnel.sidecar",
            "--config", str(self.control.config_path),
            "--certs", str(self.certs[pod.node]),
            "--node", pod.node,
            "--uid", pod.spec.uid,
            "--l7-config", str(self.l7_path),
        ]  # fmt: skip
        self.sidecars[pod.name] = (pod, pod.spawn(argv, label="sidecar"))
        return self.sidecars[pod.name]

    # -- pods -----------------------------------------------------------------------------
    def enroll(self, pod: Pod) -> None:
        """Rules and a sidecar for the pod; announced in the mesh again if it was out."""
        if not is_captured(pod.spec) or pod.name in self.sidecars:
            return
        await_ready(*self._start(pod))
        if pod.name in self.unenrolled:
            self.unenrolled.discard(pod.name)
            self.push_config()

    def unenroll(self, pod: Pod) -> None:
        """Out of the mesh first (peers stop sending it HBONE), then sidecar and rules go."""
        if pod.name not in self.sidecars:
            return
        self.unenrolled.add(pod.name)
        self.push_config()
        _, process = self.sidecars.pop(pod.name)
        process.terminate()
        uninstall_rules(pod.netns)

    # -- config ---------------------------------------------------------------------------
    def config_dump(self, pod: str) -> dict[str, Any]:
        return config_dump(self.sidecars[pod][0])

    def update_policies(self, topology: Topology | None = None) -> None:
        """Push the topology's current policies; returns once every sidecar runs with them."""
        self.push_config(topology)

    def push_config(self, topology: Topology | None = None) -> None:
        assert self.control is not None and self._cluster is not None
        pods = [pod for pod, _ in self.sidecars.values()]
        push_config(self.control, topology or self._cluster.topology, self.unenrolled, pods)

    # -- facts ------------------------------------------------------------------------------
    def facts(self) -> dict[str, str]:
        return {"trust_domain": self.trust_domain, "proxy_exemption": "mark"}

    def proxy_pids(self) -> dict[str, int]:
        return {
            f"sidecar-{name}": process.pid
            for name, (_, process) in self.sidecars.items()
            if process.poll() is None
        }

    def describe_pod(self, pod: Pod) -> str:
        if not is_captured(pod.spec):
            return f"{pod.name}: not captured (istio.io/dataplane-mode=none)"
        if pod.name not in self.sidecars:
            return f"{pod.name}: not captured (unenrolled)"
        return pod.run(["iptables-save"]).stdout
