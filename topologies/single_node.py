"""One node with a client pod and two server pods behind a service."""

from testbed.cluster import Topology


class SingleNode(Topology):
    name = "single_node"

    def build(self) -> None:
        self.add_node("node1")
        self.add_pod("client", "node1", labels={"app": "client", "role": "client"})
        for name in ("server1", "server2"):
            self.add_pod(
                name,
                "node1",
                service_account="server",
                labels={"app": "server", "role": "server", "version": name},
            )
        self.add_service("server", selector={"app": "server"}, ports=[5201, 8080, 11111])


topos = {"single_node": SingleNode}
