"""Two nodes: a client pod on node1, a server pod on each node, so that the same-node path
(client -> server1) and the cross-node path (client -> server2) both exist."""

from typing import Any

from testbed.cluster import Topology


class TwoNodes(Topology):
    name = "two_nodes"

    def __init__(self, rate: str | None = None, delay: str | None = None, **params: Any):
        super().__init__(rate=rate, delay=delay, **params)
        self.rate, self.delay = rate, delay

    def build(self) -> None:
        for node in ("node1", "node2"):
            self.add_node(node, rate=self.rate, delay=self.delay)
        self.add_pod("client", "node1", labels={"app": "client", "role": "client"})
        self.add_pod(
            "server1",
            "node1",
            service_account="server",
            labels={"app": "server", "role": "server", "version": "v1"},
        )
        self.add_pod(
            "server2",
            "node2",
            service_account="server",
            labels={"app": "server", "role": "server", "version": "v2"},
        )
        self.add_service("server", selector={"app": "server"}, ports=[5201, 8080, 11111])


topos = {"two_nodes": TwoNodes}
