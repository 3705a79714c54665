"""The chaos topology: two node pairs of pods, so every fault has a path it must not touch.

    node1: client1, server1            node2: client2, server2, the waypoint `waypoint`

Flows (testbed.chaos.rig): bulk-node1 client1 -> server1, bulk-node2 client2 -> server2,
bulk-cross client1 -> server2 (sha256-checked transfers to a sink in the server pod);
http-node2 client2 -> server2:80 and http-waypoint client1 -> web:80 (fixed-rate GETs to
the servers' HTTP echo app; service `web` selects server2 and uses the waypoint).
"""

from __future__ import annotations

from testbed.cluster.model import Topology
from testbed.cluster.waypoints import USE_WAYPOINT

HTTP_PORT = 80
WAYPOINT = "waypoint"


class ChaosTopology(Topology):
    name = "chaos"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.add_waypoint(WAYPOINT, "node2")
        for index in ("1", "2"):
            node = f"node{index}"
            self.add_pod(f"client{index}", node, labels={"app": f"client{index}"})
            labels = {"app": f"server{index}"} | ({"serves": "web"} if index == "2" else {})
            self.add_pod(f"server{index}", node, labels=labels, app="http-echo", port=HTTP_PORT)
        self.add_service(
            "web", selector={"serves": "web"}, ports=[HTTP_PORT], labels={USE_WAYPOINT: WAYPOINT}
        )
