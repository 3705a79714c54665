"""Mode `sidecar`: Istio's classic data plane, one proxy per pod (docs/architecture.md).

Each captured pod gets istio-iptables rules (testbed.redirect.sidecar_rules, the proxy's own
sockets exempted by mark 0x539) and its own proxy process inside its namespace: the ztunnel
code serving that one workload (testbed.mesh.ztunnel.sidecar), HBONE between sidecars.

Istio's sidecar (REDIRECT interception) reaches the app from 127.0.0.6; here the proxy
connects from the client's own address, as the ambient modes do, so that every mode shows
the app the same peer. Two testbed additions make that work: the proxy's connections to its
app over lo skip the outbound capture, and the app's replies to them are routed back to the
proxy by connmark 0x111 and the local table 100 (the same policy routing as inpod mode).

Options (MeshOptions): `trust_domain` (default cluster.local). Waypoints are not started:
in sidecar mode the sidecars themselves are the L7 proxies.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.cluster.clusterdns import DNS_SERVICE_VIP
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.netlab.host import CommandRunner
from testbed.redirect import sidecar_rules
from testbed.redirect.base import MeshMode, MeshOptions
from testbed.redirect.control import is_captured, write_atomically
from testbed.redirect.rules import (
    TPROXY_MARK,
    Rule,
    policy_routes,
    remove_iptables_chains,
    restore_script,
)
from testbed.redirect.waypoint_config import app_protocols_of

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod

RETURN_PRERT, RETURN_OUTPUT = "TB_ORIGSRC_PRERT", "TB_ORIGSRC_OUTPUT"
RETURN_CHAINS = (RETURN_PRERT, RETURN_OUTPUT)
_MARK, _CONNMARK = sidecar_rules.PROXY_MARK, TPROXY_MARK


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
    script = restore_script(original_source_rules())
    exemption = f"! -s {pod_ip}/32 -o lo -m mark --mark {_MARK} -j RETURN"
    return script + f"*nat\n-I {sidecar_rules.OUTPUT} 1 {exemption}\nCOMMIT\n"


def install_rules(netns: CommandRunner, pod_ip: str) -> None:
    # the pod's nameserver is the cluster DNS service; its queries go to the sidecar's 15053
    sidecar_rules.install(netns, "mark", dns_servers=[DNS_SERVICE_VIP])
    remove_iptables_chains(netns, RETURN_CHAINS)
    netns.run(["iptables-restore", "--noflush"], input=render_original_source(pod_ip))
    for command in policy_routes():
        netns.run(command.argv("add"))


def uninstall_rules(netns: CommandRunner) -> None:
    sidecar_rules.uninstall(netns)
    remove_iptables_chains(netns, RETURN_CHAINS)
    for command in reversed(policy_routes()):
        netns.run(command.argv("del"), check=False)


class SidecarMode(MeshMode):
    name = "sidecar"
    captures_dns = True
    l7_in_sidecars = True  # Envoy sidecars: routes, retries and L7 policy in the pods' proxies

    def __init__(self, options: MeshOptions | None = None) -> None:
        super().__init__(options)
        self.certs: dict[str, Path] = {}  # node -> its certificate folder
        self.l7_path = Path()  # routes and L7 policies for the sidecars, written at install

    def start_proxies(self, cluster: Cluster) -> None:
        """Certificates per node, then every captured pod's sidecar (waited for together)."""
        # Every route and L7 policy of the topology; each sidecar applies its destination's.
        self.l7_path = self.lab.add_file(self.mesh.directory / "sidecar-l7.yaml")
        l7 = cluster.topology.l7
        declared = app_protocols_of(cluster.topology)  # each port's appProtocol, if declared
        sidecar_l7 = WaypointConfig(routes=l7.routes, policies=l7.policies, app_protocols=declared)
        write_atomically(self.l7_path, sidecar_l7.dump_yaml())
        for node in cluster.nodes:
            self.certs[node] = self.lab.add_dir(self.mesh.directory / f"sidecars-{node}")
            self.mesh.issue_node_certs(cluster.topology, node, self.certs[node])
        for pod in cluster.pods.values():
            if is_captured(pod.spec):
                self._start_sidecar(pod)

    def _start_sidecar(self, pod: Pod) -> None:
        install_rules(pod.netns, pod.ip)
        module, certs = "testbed.mesh.ztunnel.sidecar", self.certs[pod.node]
        argv = self.proxy_argv(
            module, certs, pod.node, "--uid", pod.spec.uid, "--l7-config", str(self.l7_path)
        )
        self.start_proxy(f"sidecar-{pod.name}", pod, argv, kind="sidecar")

    # -- pods -----------------------------------------------------------------------------
    def capture(self, pod: Pod) -> None:
        """Rules and a sidecar for the pod (already there for the pods of the install)."""
        label = f"sidecar-{pod.name}"
        if label not in self.proxies:
            self._start_sidecar(pod)
            self.await_ready([self.proxies[label]])

    def release(self, pod: Pod) -> None:
        self.stop_proxy(f"sidecar-{pod.name}")
        uninstall_rules(pod.netns)

    def config_dump(self, pod: str) -> dict[str, Any]:
        return self.proxies[f"sidecar-{pod}"].config_dump()

    # -- facts ------------------------------------------------------------------------------
    def found_facts(self) -> dict[str, str]:
        return {"proxy_exemption": "mark"}

    def describe_capture(self, pod: Pod) -> str:
        return pod.run(["iptables-save"]).stdout
