"""Services without a mesh: kube-proxy's iptables DNAT in each node namespace.

Kubernetes spreads a ClusterIP's connections over its endpoints with a chain of
`statistic --mode random` rules (probability 1/n, 1/(n-1), ..., then unconditional).
"""

from __future__ import annotations

from collections.abc import Iterable

from testbed.cluster.model import PodSpec, ServiceSpec


def render_service_rules(services: Iterable[tuple[ServiceSpec, list[PodSpec]]]) -> str:
    lines = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        "-A PREROUTING -j KUBE-SERVICES",
        "-A OUTPUT -j KUBE-SERVICES",
    ]
    for service, endpoints in services:
        for port, target in sorted(service.ports.items()):
            match = f"-A KUBE-SERVICES -d {service.vip}/32 -p tcp -m tcp --dport {port}"
            remaining = len(endpoints)
            for pod in endpoints:
                pick = (
                    f" -m statistic --mode random --probability {1 / remaining:.5f}"
                    if remaining > 1
                    else ""
                )
                lines.append(f"{match}{pick} -j DNAT --to-destination {pod.ip}:{target}")
                remaining -= 1
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
