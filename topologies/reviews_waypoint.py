"""A waypoint in front of a two-version `reviews` service (in the spirit of Istio's
Bookinfo): 90/10 split between v1 and v2, `/v2/...` pinned to v2, `/admin` denied at L7.
Each reviews pod runs the HTTP echo app on 8080 (its `x-served-by` header names the pod).
`ratings` is a flaky backend: its echo app answers 503 to every third request, which Istio's
default retries (2, on 503 among others) hide from clients; its port declares
`appProtocol: http`, so it is HTTP without sniffing (reviews' ports are sniffed), and
`GET /stats` in the pod shows the 503s it sent. `reviews_waypoint,apps=false` leaves 8080
free for servers of one's own.

    testbed up reviews_waypoint --mode inpod
    testbed:...> curl productpage http://reviews:9080/        (mostly reviews-v1)
    testbed:...> curl productpage http://reviews:9080/v2/x    (always reviews-v2)
    testbed:...> curl productpage http://reviews:9080/admin   (403 from the waypoint)
    testbed:...> curl productpage http://ratings:9080/        (always 200: retried)
    testbed:...> curl ratings http://127.0.0.1:8080/stats     (the 503s it answered)

In sidecar mode no waypoint runs: the sidecars do its L7 work.
"""

from testbed.cluster import Topology

USE_WAYPOINT = "istio.io/use-waypoint"
RATINGS_FAIL_EVERY = 3  # the ratings app answers 503 to every third request


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
        self.add_pod(
            "ratings",
            "node2",
            labels={"app": "ratings", "role": "server"},
            app=f"http-echo --fail-every {RATINGS_FAIL_EVERY}" if self.apps else None,
            port=8080 if self.apps else None,
        )
        self.add_service(
            "ratings", selector={"app": "ratings"}, ports={9080: 8080}, app_protocols={9080: "http"}
        )
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
