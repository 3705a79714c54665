"""Built-in topologies with L4 policies of every match kind, for the tests that check the
generated mesh config against what Istio's ztunnel reads (tests/unit and tests/integration)."""

from __future__ import annotations

from typing import Any

from testbed.cluster import Topology, plan
from testbed.cluster.loader import load_topology

# Every kind of L4 match a topology can express, in Istio's AuthorizationPolicy forms.
POLICIES: list[dict[str, Any]] = [
    {
        "name": "allow-kinds",
        "action": "ALLOW",
        "rules": [
            {
                "principals": ["cluster.local/ns/default/sa/client", "cluster.local/ns/*"],
                "not_principals": ["*/sa/evil", "*"],
                "namespaces": ["default", "team-*"],
                "not_namespaces": ["*-test", "*"],
                "ip_blocks": ["10.244.0.0/16", "10.245.1.7"],
                "not_ip_blocks": ["10.244.9.0/24"],
                "ports": [8080, 5201],
                "not_ports": [9999],
            },
            {"namespaces": ["*"]},
            {},
        ],
    },
    {
        "name": "deny-selected",
        "action": "DENY",
        "selector": {"role": "server"},
        "rules": [{"principals": ["*/ns/jobs/sa/*"], "not_ports": [22]}],
    },
    {
        "name": "mesh-deny",
        "action": "DENY",
        "namespace": "istio-system",
        "rules": [{"ports": [6666], "not_namespaces": ["istio-system"]}],
    },
]


def with_policies(name: str) -> Topology:
    """The built-in topology `name`, planned, with POLICIES added."""
    topology = load_topology(name)
    for policy in POLICIES:
        topology.add_policy(**policy)
    return plan(topology)
