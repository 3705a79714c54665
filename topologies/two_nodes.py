"""Two nodes: a client pod on node1, a server pod on each node, so that the same-node path
(client -> server1) and the cross-node path (client -> server2) both exist. Each server runs
the HTTP echo app on port 80 (the ports 5201, 8080 and 11111 stay free for the tools that
experiments and the shell's `iperf` start; `two_nodes,apps=false` runs none):

    testbed up two_nodes
    testbed:...> curl client http://server2/        (the reply names the pod that answered)
"""

from typing import Any

from testbed.cluster import Topology

HTTP_PORT = 80  # the servers' HTTP echo app


class TwoNodes(Topology):
    name = "two_nodes"

    def __init__(
        self, rate: str | None = None, delay: str | None = None, apps: bool = True, **params: Any
    ):
        super().__init__(rate=rate, delay=delay, apps=apps, **params)
        if not isinstance(apps, bool):
            raise self.error(f"apps={apps!r}: expected true or false")
        self.rate, self.delay = rate, delay
        self.app = "http-echo" if apps else None
        self.port = HTTP_PORT if apps else None

    def build(self) -> None:
        for node in ("node1", "node2"):
            self.add_node(node, rate=self.rate, delay=self.delay)
        self.add_pod("client", "node1", labels={"app": "client", "role": "client"})
        self.add_pod(
            "server1",
            "node1",
            service_account="server",
            labels={"app": "server", "role": "server", "version": "v1"},
            app=self.app,
            port=self.port,
        )
        self.add_pod(
            "server2",
            "node2",
            service_account="server",
            labels={"app": "server", "role": "server", "version": "v2"},
            app=self.app,
            port=self.port,
        )
        self.add_service("server", selector={"app": "server"}, ports=[5201, 8080, 11111])


topos = {"two_nodes": TwoNodes}
