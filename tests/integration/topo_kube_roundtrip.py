"""reviews_waypoint's pods, services and waypoint without its route and L7 policy: the
round-trip test applies those back from their exported Istio YAML."""

from testbed.cluster import Topology


class ReviewsBare(Topology):
    name = "reviews_bare"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.label_namespace("default", {"istio.io/use-waypoint": "waypoint"})
        self.add_waypoint("waypoint", "node2")
        self.add_pod("productpage", "node1", labels={"app": "productpage", "role": "client"})
        for version, node in (("v1", "node1"), ("v2", "node2")):
            labels = {"app": "reviews", "version": version, "role": "server"}
            self.add_pod(f"reviews-{version}", node, service_account="reviews", labels=labels)
            self.add_service(f"reviews-{version}", selector=labels, ports={9080: 8080})
        self.add_service("reviews", selector={"app": "reviews"}, ports={9080: 8080})


topos = {"reviews_bare": ReviewsBare}
