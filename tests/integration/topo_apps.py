"""Pods with declared apps, for tests/integration/test_apps.py: the HTTP echo, iperf3,
sockperf, a command that listens, a command that crashes, and a client with none."""

from testbed.cluster import Topology

CRASHER = ["sh", "-c", "echo about to fail; echo second line >&2; exit 3"]


class Apps(Topology):
    name = "apps"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.add_pod("client", "node1")
        self.add_pod("web", "node2", labels={"app": "web"}, app="http-echo", port=8080)
        self.add_pod("perf", "node2", app="iperf3")
        self.add_pod("rr", "node1", app="sockperf")
        self.add_pod("listener", "node1", app="python3 -m http.server 7000", port=7000)
        self.add_pod("crasher", "node2", app=CRASHER)
        self.add_service("front", selector={"app": "web"}, ports={80: 8080})


topos = {"apps": Apps}
