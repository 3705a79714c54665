"""The sidecar (docs/architecture.md): one proxy per pod, inside the pod's namespace, serving that
one workload with ztunnel's L4 handlers and, for HTTP, the waypoint's L7 pipeline
(testbed.mesh.ztunnel.sidecar_l7), as Istio's Envoy sidecars do.

The pod's istio-iptables rules REDIRECT outbound TCP to 15001 and inbound TCP to 15006; HBONE
arrives on 15008. Every socket the proxy opens carries mark 0x539, which the rules exempt.
A port's declared `appProtocol` says HTTP or TCP; an undeclared one is sniffed from its first
bytes. Routes, L7 policies and the declared protocols come from `--l7-config` (the
waypoint's file format, every route, policy and declaration of the mesh: the mesh config,
like ztunnel's, carries no appProtocol; without it: no routes, no L7 policies, all sniffed).
The file is watched and reloaded like the mesh config. Being the L7 proxy itself, a sidecar ignores
waypoint attachments in the mesh config (no waypoint runs in sidecar mode): it goes to the
endpoints directly and takes HBONE from any peer its policies allow.

    python -m testbed.mesh.ztunnel.sidecar --config FILE --certs DIR --node NAME --uid UID
        [--l7-config FILE]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.mesh.config import LocalConfig
from testbed.mesh.hbone import HboneServer
from testbed.mesh.proxy.watch import Watched
from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.waypoint.telemetry import RequestMetrics
from testbed.mesh.ztunnel.inbound import HboneInbound, serve_inbound_plaintext
from testbed.mesh.ztunnel.pods import PodProxy
from testbed.mesh.ztunnel.process import ZtunnelProcess, main
from testbed.mesh.ztunnel.sidecar_l7 import SidecarL7
from testbed.mesh.ztunnel.state import config_digest


def without_waypoints(config: LocalConfig) -> LocalConfig:
    """`config` with no workload or service bound to a waypoint."""
    return LocalConfig(
        workloads=[w.model_copy(update={"waypoint": None}) for w in config.workloads],
        services=[s.model_copy(update={"waypoint": None}) for s in config.services],
        policies=config.policies,
    )


class Sidecar(ZtunnelProcess):
    shape = "sidecar"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.config, args.certs, args.node, proxy="sidecar")
        self.l7: SidecarL7 | None = None
        self.on_config(self.mesh.config)
        self.uid: str = args.uid
        self.l7_path: Path | None = args.l7_config
        self.l7_config = WaypointConfig.load(args.l7_config) if args.l7_config else WaypointConfig()
        self.request_metrics = RequestMetrics.register(self.registry)

    async def start(self) -> None:
        own_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        pod = PodProxy(self.mesh, self.uid, own_netns)
        self.l7 = SidecarL7(pod, self.l7_config, self.request_metrics)
        context = self.mesh.certs.server_context(pod.workload.identity)
        hbone = HboneServer(context, self.l7.inbound(HboneInbound(pod)))
        await pod.start(self.l7.serve_outbound, serve_inbound_plaintext, hbone)
        self.pods[self.uid] = pod
        self.ready = True

    def on_config(self, config: LocalConfig) -> None:
        super().on_config(without_waypoints(config))
        self.mesh.digest = config_digest(config)  # the file's version, which the mode awaits
        if self.l7 is not None:
            self.l7.update()

    def on_l7(self, l7: WaypointConfig) -> None:
        self.l7_config = l7
        if self.l7 is not None:
            self.l7.update(l7)

    def watched(self) -> Sequence[Watched[Any]]:
        if self.l7_path is None:
            return super().watched()
        return [*super().watched(), Watched(self.l7_path, WaypointConfig.load, self.on_l7)]

    def config_dump(self) -> dict[str, Any]:
        l7 = self.l7_config.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return {**super().config_dump(), "l7": l7}

    async def stop(self) -> None:
        if self.l7 is not None:
            await self.l7.close()
        await super().stop()


if __name__ == "__main__":
    main(
        "testbed.mesh.ztunnel.sidecar",
        Sidecar,
        {"uid": "the workload's uid in the mesh config"},
        __doc__,
        optional={"l7-config": "routes and L7 policies (the waypoint's L7 file format)"},
    )
