"""Mode `ebpf`: Istio ambient's experimental eBPF redirection (Istio 1.18-1.20).

Per node, a ztunnel pod (istio-system/ztunnel, started by testbed.redirect.base)
running one ztunnel in the "shared netns" shape (testbed.mesh.ztunnel.shared, as in legacy
mode): IP_TRANSPARENT listeners on
15001/15006/15008 in its own namespace, the original destination read from the local
address, connections to apps made from the client pod's address. Instead of iptables and
tunnels, tc programs compiled from testbed/redirect/bpf/ steer packets: an enrolled pod's
host-side veth sends its TCP and UDP to ztunnel's veth (bpf_redirect), and inside ztunnel's
namespace bpf_sk_assign hands each TCP packet to ztunnel's socket (testbed.redirect.ebpf_node);
the pods' DNS (UDP 53) is captured and answered by ztunnel's DNS proxy on 15053. As Istio's
programs do, they drop an enrolled pod's traffic while no ztunnel is attached for its node and
pass a packet no ztunnel listener matches.

Enrolling a pod puts it in its node's pod map and attaches two programs to its host-side
veth; unenrolling removes both. Programs and maps are pinned in a bpffs the run mounts at
<run dir>/bpf; teardown unpins and unmounts it.

Options (EbpfOptions): `ebpf_hook` tc (default) | tcx | auto; `same_node_fast_path` true
(default, Istio 1.20's shared ztunnel) | false, as in legacy mode; `trust_domain` (default
cluster.local).
tc filters are what `tc filter show` and `bpftool net show` list; tcx links (kernel 6.6+)
are invisible to this machine's iproute2 6.1 and bpftool 7.1, hence not the default. `auto`
takes tcx where the kernel has it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from testbed.redirect import bpfload
from testbed.redirect.base import NodeZtunnelMode, SharedZtunnelOptions
from testbed.redirect.ebpf_node import DIRECTIONS, Hook, NodeDatapath

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod
    from testbed.netlab import Netns


class EbpfOptions(SharedZtunnelOptions):
    ebpf_hook: Literal["tc", "tcx", "auto"] = "tc"


class EbpfMode(NodeZtunnelMode):
    name = "ebpf"
    captures_dns = True
    Options = EbpfOptions
    options: EbpfOptions

    def __init__(self, options: EbpfOptions | None = None) -> None:
        super().__init__(options)
        self.hook: Hook | None = None
        self.datapaths: dict[str, NodeDatapath] = {}
        self._bpffs: Path | None = None

    # -- install ------------------------------------------------------------------------
    def install(self, cluster: Cluster) -> None:
        bpfload.object_path()  # not built: say so before anything is created
        super().install(cluster)

    def prepare(self, cluster: Cluster) -> None:
        self._bpffs = bpfload.mount_bpffs(self.lab)

    def install_node(self, cluster: Cluster, node: str, ztunnel: Pod) -> None:
        assert self._bpffs is not None
        target = cluster.nodes[node]
        if self.hook is None:
            self.hook = self._choose_hook(target.netns, ztunnel.spec.host_ifname)
        self.datapaths[node] = NodeDatapath.install(
            self.lab,
            self._bpffs,
            node,
            node=target.netns,
            ztunnel=ztunnel.netns,
            ztunnel_host_dev=ztunnel.spec.host_ifname,
            ztunnel_ip=ztunnel.ip,
            host_ip=target.spec.gateway_ip,
            hook=self.hook,
        )

    def _choose_hook(self, node: Netns, dev: str) -> Hook:
        if self.options.ebpf_hook == "auto":
            return "tcx" if bpfload.tcx_available(node, dev) else "tc"
        return "tcx" if self.options.ebpf_hook == "tcx" else "tc"

    # -- pods -----------------------------------------------------------------------------
    def capture(self, pod: Pod) -> None:
        """Into its node's pod map, programs on its veth."""
        self.datapaths[pod.node].enroll(pod.ip, pod.netns, pod.spec.host_ifname)

    def release(self, pod: Pod) -> None:
        self.datapaths[pod.node].unenroll(pod.ip, pod.spec.host_ifname)

    # -- facts --------------------------------------------------------------------------------
    def found_facts(self) -> dict[str, str]:
        return {"ebpf_hook": self.hook} if self.hook else {}

    def describe_capture(self, pod: Pod) -> str:
        datapath = self.datapaths[pod.node]
        entry = next((e for e in datapath.enrolled() if e.ip == pod.ip), None)
        lines = [f"{pod.name}: pod map of {pod.node}: {entry}"]
        for direction in DIRECTIONS:
            names = bpfload.attached_programs(datapath.node, pod.spec.host_ifname, direction)
            lines.append(f"{pod.spec.host_ifname} {direction} ({self.hook}): {', '.join(names)}")
        return "\n".join(lines)
