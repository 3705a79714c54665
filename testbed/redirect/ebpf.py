"""Mode `ebpf`: Istio ambient's experimental eBPF redirection (Istio 1.18-1.20, DESIGN.md 4.3).

Per node, a ztunnel pod (istio-system/ztunnel, started by testbed.redirect.ztunnel_fleet)
running one ztunnel in the "shared netns" shape (testbed.mesh.ztunnel.shared, as in legacy
mode): IP_TRANSPARENT listeners on
15001/15006/15008 in its own namespace, the original destination read from the local
address, connections to apps made from the client pod's address. Instead of iptables and
tunnels, tc programs compiled from testbed/redirect/bpf/ steer packets: an enrolled pod's
host-side veth sends its TCP to ztunnel's veth (bpf_redirect), and inside ztunnel's
namespace bpf_sk_assign hands each packet to ztunnel's socket (testbed.redirect.ebpf_node).

Enrolling a pod puts it in its node's pod map and attaches two programs to its host-side
veth; unenrolling removes both. Programs and maps are pinned in a bpffs the run mounts at
<run dir>/bpf; teardown unpins and unmounts it.

Options: `ebpf_hook` tc (default) | tcx | auto; `trust_domain` (default cluster.local).
tc filters are what `tc filter show` and `bpftool net show` list; tcx links (kernel 6.6+)
are invisible to this machine's iproute2 6.1 and bpftool 7.1, hence not the default. `auto`
takes tcx where the kernel has it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN
from testbed.redirect import bpfload
from testbed.redirect.control import is_captured
from testbed.redirect.ebpf_node import DIRECTIONS, Hook, NodeDatapath
from testbed.redirect.ztunnel_fleet import ZtunnelFleet

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.cluster.model import Topology
    from testbed.netlab import Netns

OPTIONS = ("ebpf_hook", "trust_domain")
HOOK_CHOICES = ("tc", "tcx", "auto")


class EbpfMode:
    name = "ebpf"

    def __init__(self, hook: str = "tc", trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.wanted_hook = hook
        self.hook: Hook | None = None
        self.trust_domain = trust_domain
        self.datapaths: dict[str, NodeDatapath] = {}
        self.enrolled: set[str] = set()
        self._fleet: ZtunnelFleet | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> EbpfMode:
        from testbed.redirect import ModeError

        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ModeError(f"mode ebpf: unknown option(s) {unknown}; expected some of {OPTIONS}")
        hook = str(options.get("ebpf_hook", "tc"))
        if hook not in HOOK_CHOICES:
            raise ModeError(f"mode ebpf: ebpf_hook {hook!r}: expected one of {HOOK_CHOICES}")
        return cls(hook, str(options.get("trust_domain", DEFAULT_TRUST_DOMAIN)))

    @property
    def fleet(self) -> ZtunnelFleet:
        if self._fleet is None:
            raise RuntimeError("mode ebpf is not installed")
        return self._fleet

    # -- install ------------------------------------------------------------------------
    def install(self, cluster: Cluster) -> None:
        bpfload.object_path()  # not built: say so before anything is created
        self._fleet = ZtunnelFleet(cluster, self.trust_domain)
        bpffs = bpfload.mount_bpffs(cluster._lab)
        for node in cluster.nodes:
            pod = self.fleet.add_ztunnel_pod(node)
            self.datapaths[node] = self._install_datapath(cluster, node, pod, bpffs)
            self.fleet.start(node, pod)
        self.fleet.await_ready()
        for app in cluster.pods.values():
            self.enroll(app)

    def _install_datapath(
        self, cluster: Cluster, node: str, ztunnel: Pod, bpffs: Path
    ) -> NodeDatapath:
        target = cluster.nodes[node]
        if self.hook is None:
            self.hook = self._choose_hook(target.netns, ztunnel.spec.host_ifname)
        return NodeDatapath.install(
            cluster._lab,
            bpffs,
            node,
            node=target.netns,
            ztunnel=ztunnel.netns,
            ztunnel_host_dev=ztunnel.spec.host_ifname,
            ztunnel_ip=ztunnel.ip,
            host_ip=target.spec.gateway_ip,
            hook=self.hook,
        )

    def _choose_hook(self, node: Netns, dev: str) -> Hook:
        if self.wanted_hook == "auto":
            return "tcx" if bpfload.tcx_available(node, dev) else "tc"
        return "tcx" if self.wanted_hook == "tcx" else "tc"

    # -- pods -----------------------------------------------------------------------------
    def enroll(self, pod: Pod) -> None:
        """Into its node's pod map, programs on its veth; announced in the mesh again if it
        was taken out before."""
        if not is_captured(pod.spec) or pod.name in self.enrolled:
            return
        self.datapaths[pod.node].enroll(pod.ip, pod.netns, pod.spec.host_ifname)
        self.enrolled.add(pod.name)
        self.fleet.put_back(pod.name)

    def unenroll(self, pod: Pod) -> None:
        """Out of the mesh first (peers stop sending it HBONE), then out of the datapath."""
        if pod.name not in self.enrolled:
            return
        self.fleet.take_out(pod.name)
        self.datapaths[pod.node].unenroll(pod.ip, pod.spec.host_ifname)
        self.enrolled.discard(pod.name)

    def update_policies(self, topology: Topology | None = None) -> None:
        self.fleet.push_config(topology)

    def config_dump(self, node: str) -> dict[str, Any]:
        return self.fleet.ztunnels[node].config_dump()

    # -- facts --------------------------------------------------------------------------------
    def facts(self) -> dict[str, str]:
        return {"ebpf_hook": self.hook or self.wanted_hook, "trust_domain": self.trust_domain}

    def proxy_pids(self) -> dict[str, int]:
        return self.fleet.proxy_pids() if self._fleet else {}

    def describe_pod(self, pod: Pod) -> str:
        if not is_captured(pod.spec):
            return f"{pod.name}: not captured (istio.io/dataplane-mode=none)"
        if pod.name not in self.enrolled:
            return f"{pod.name}: not captured (unenrolled)"
        datapath = self.datapaths[pod.node]
        entry = next((e for e in datapath.enrolled() if e.ip == pod.ip), None)
        lines = [f"{pod.name}: pod map of {pod.node}: {entry}"]
        for direction in DIRECTIONS:
            names = bpfload.attached_programs(datapath.node, pod.spec.host_ifname, direction)
            lines.append(f"{pod.spec.host_ifname} {direction} ({self.hook}): {', '.join(names)}")
        return "\n".join(lines)
