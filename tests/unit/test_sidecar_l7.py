"""The L7 sidecar's pure parts: which services a workload serves on a port, and which L7
policies its inbound requests are judged by."""

from __future__ import annotations

from waypoint_support import local_config, service_key

from testbed.mesh.waypoint.config import WaypointConfig
from testbed.mesh.ztunnel.sidecar_l7 import inbound_policies, services_of


def test_services_of_a_workload_by_target_port() -> None:
    config = local_config()
    r1 = config.workload_by_ip("10.244.2.2")
    assert r1 is not None
    keys = [s.key for s in services_of(config, r1, 9080)]
    assert keys == sorted(service_key(n) for n in ("reviews", "reviews-v1", "flaky"))
    assert services_of(config, r1, 1234) == []


def test_inbound_policies_are_those_of_the_workloads_services_or_namespace() -> None:
    config = local_config()
    r2 = config.workload_by_ip("10.244.2.3")  # reviews and reviews-v2, namespace default
    assert r2 is not None
    l7 = WaypointConfig.model_validate(
        {
            "policies": [
                {"name": "mine", "targets": [service_key("reviews-v2")], "action": "DENY"},
                {"name": "not-mine", "targets": [service_key("flaky")], "action": "DENY"},
                {"name": "namespace", "namespace": "default", "action": "DENY"},
                {"name": "elsewhere", "namespace": "other", "action": "DENY"},
            ]
        }
    )
    chosen = inbound_policies(l7, config, r2).policies
    assert [p.name for p in chosen] == ["mine", "namespace"]
    assert all(p.targets == [] for p in chosen)  # they apply whatever service was called
