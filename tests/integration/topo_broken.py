"""Topologies that are wrong on purpose, for the CLI's bad-input tests."""

from testbed.cluster import Topology


class Broken(Topology):
    def build(self) -> None:
        self.add_node("node1")
        print(1 / 0)


class DuplicatePod(Topology):
    def build(self) -> None:
        self.add_node("node1")
        self.add_pod("web", "node1")
        self.add_pod("web", "node1")


class Orphan(Topology):
    def build(self) -> None:
        self.add_node("node1")
        self.add_pod("web", "node9")


topos = {"broken": Broken, "duplicate": DuplicatePod, "orphan": Orphan}
