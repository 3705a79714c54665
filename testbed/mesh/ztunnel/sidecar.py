"""ztunnel as a sidecar (DESIGN.md 4.4): one proxy per pod, inside the pod's namespace,
serving that one workload with the same handlers as in inpod mode.

The pod's istio-iptables rules REDIRECT outbound TCP to 15001 and inbound TCP to 15006; HBONE
arrives on 15008. Every socket the proxy opens carries mark 0x539, which the rules exempt.

    python -m testbed.mesh.ztunnel.sidecar --config FILE --certs DIR --node NAME --uid UID
"""

from __future__ import annotations

import argparse
import os
import sys

from testbed.mesh.hbone import HboneServer
from testbed.mesh.ztunnel.inbound import HboneInbound, serve_inbound_plaintext
from testbed.mesh.ztunnel.outbound import serve_outbound
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.process import ZtunnelProcess, main


class Sidecar(ZtunnelProcess):
    shape = "sidecar"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.config, args.certs, args.node, proxy="sidecar")
        self.uid: str = args.uid

    async def start(self) -> None:
        own_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        pod = PodProxy(self.mesh, self.uid, own_netns)
        context = self.mesh.certs.server_context(pod.workload.identity)
        await pod.start(
            serve_outbound, serve_inbound_plaintext, HboneServer(context, HboneInbound(pod))
        )
        self.pods[self.uid] = pod
        self.ready = True


if __name__ == "__main__":
    main(
        sys.argv[1:],
        "testbed.mesh.ztunnel.sidecar",
        Sidecar,
        {"uid": "the workload's uid in the mesh config"},
        __doc__,
    )
