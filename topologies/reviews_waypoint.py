"""A waypoint in front of a two-version `reviews` service (in the spirit of Istio's
Bookinfo): 90/10 split between v1 and v2, `/v2/...` pinned to v2, `/admin` denied at L7.
Each reviews pod runs the HTTP echo app on 8080 (its `x-served-by` header names the pod);
`reviews_waypoint,apps=false` leaves 8080 free for servers of one's own.

    testbed up reviews_waypoint --mode inpod
    testbed:...> curl productpage http://reviews:9080/        (mostly reviews-v1)
    testbed:...> curl productpage http://reviews:9080/v2/x    (always reviews-v2)
    testbed:...> curl productpage http://reviews:9080/admin   (403 from the waypoint)
"""

from testbed.cluster import Topology

USE_WAYPOINT = "istio.io/use-waypoint"


class ReviewsWaypoint(Topology):
    name = "reviews_waypoint"

    def __init__(self, apps: bool = True) -> None:
        super().__init__(apps=apps)
        if not isinstance(apps, bool):
            raise self.error(f"apps={apps!r}: expected true or false")
        self.apps = apps

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.label_namespace("default", {USE_WAYPOINT: "waypoint"})
        self.add_waypoint("waypoint", "node2")
        self.add_pod("productpage", "node1", labels={"app": "productpage", "role": "client"})
        for version, node in (("v1", "node1"), ("v2", "node2")):
            labels = {"app": "reviews", "version": version, "role": "server"}
            self.add_pod(
                f"reviews-{version}",
                node,
                service_account="reviews",
                labels=labels,
                app="http-echo" if self.apps else None,
                port=8080 if self.apps else None,
            )
            self.add_service(f"reviews-{version}", selector=labels, ports={9080: 8080})
        self.add_service("reviews", selector={"app": "reviews"}, ports={9080: 8080})
        self.add_http_route(
            "reviews",
            services=["reviews"],
            rules=[
                {"backends": [{"service": "reviews-v1", "weight": 90},
                              {"service": "reviews-v2", "weight": 10}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                 "backends": [{"service": "reviews-v2"}]},
            ],
        )  # fmt: skip
        deny_admin = [{"to": [{"paths": ["/admin*"]}]}]
        self.add_l7_policy("no-admin", action="DENY", services=["reviews"], rules=deny_admin)


topos = {"reviews_waypoint": ReviewsWaypoint}
