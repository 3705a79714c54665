"""N nodes with P pods each, spread round-robin; pod 0 is the client, the rest servers."""

from testbed.cluster import Topology


class MultiNode(Topology):
    name = "multi_node"

    def __init__(self, nodes: int = 3, pods: int = 6) -> None:
        super().__init__(nodes=nodes, pods=pods)
        if not isinstance(nodes, int) or nodes < 1:
            raise self.error(f"nodes={nodes!r}: expected a positive integer")
        if not isinstance(pods, int) or pods < 1:
            raise self.error(f"pods={pods!r}: expected a positive integer (pods per node)")
        self.node_count, self.pods_per_node = nodes, pods

    def build(self) -> None:
        names = [self.add_node(f"node{i}") for i in range(1, self.node_count + 1)]
        for i in range(self.node_count * self.pods_per_node):
            role = "client" if i == 0 else "server"
            self.add_pod(
                f"pod{i}",
                names[i % self.node_count],
                service_account=role,
                labels={"app": role, "role": role},
            )
        self.add_service("server", selector={"app": "server"}, ports=[5201, 8080, 11111])


topos = {"multi_node": MultiNode}
