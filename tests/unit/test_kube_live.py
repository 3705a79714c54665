"""apply_to_cluster: declarations change in the cluster's topology, a dataplane-mode label
change enrolls or unenrolls the pod through the mode, and the mode pushes the policies."""

from __future__ import annotations

from typing import Any

from testbed.cluster import load_topology, plan
from testbed.kube.documents import parse_resources
from testbed.kube.live import apply_to_cluster


class FakeMode:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def enroll(self, pod: Any) -> None:
        self.calls.append(("enroll", pod))

    def unenroll(self, pod: Any) -> None:
        self.calls.append(("unenroll", pod))

    def update_policies(self, topology: Any) -> None:
        self.calls.append(("update_policies", sorted(topology.policies)))


class FakeCluster:
    def __init__(self) -> None:
        self.topology = plan(load_topology("two_nodes"))
        self.mode = FakeMode()

    def pod(self, name: str) -> str:
        return name


def test_apply_and_delete_through_the_mode() -> None:
    cluster = FakeCluster()
    docs = parse_resources(
        [
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "deny", "namespace": "default"},
             "spec": {"action": "DENY", "rules": [{}]}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "server2", "labels": {"istio.io/dataplane-mode": "none"}}},
        ]
    )  # fmt: skip
    apply_to_cluster(cluster, docs)  # type: ignore[arg-type]
    assert cluster.mode.calls == [("unenroll", "server2"), ("update_policies", ["deny"])]
    cluster.mode.calls.clear()
    apply_to_cluster(cluster, docs, delete=True)  # type: ignore[arg-type]
    assert cluster.mode.calls == [("enroll", "server2"), ("update_policies", [])]
