"""Services without a mesh: kube-proxy's iptables DNAT in each node namespace.

Kubernetes spreads a ClusterIP's connections over its endpoints with a chain of
`statistic --mode random` rules (probability 1/n, 1/(n-1), ..., then unconditional).
"""

from __future__ import annotations

from collections.abc import Iterable

from testbed.cluster.model import PodSpec, ServiceSpec


def render_service_rules(
    services: Iterable[tuple[ServiceSpec, list[PodSpec]]], dns: tuple[str, str] | None = None
) -> str:
    """The nat rules; `dns` = (cluster DNS VIP, its pod's IP) adds port 53 over UDP and TCP."""
    lines = [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        "-A PREROUTING -j KUBE-SERVICES",
        "-A OUTPUT -j KUBE-SERVICES",
    ]
    if dns is not None:
        vip, pod_ip = dns
        for proto in ("udp", "tcp"):
            lines.append(
                f"-A KUBE-SERVICES -d {vip}/32 -p {proto} -m {proto} --dport 53"
                f" -j DNAT --to-destination {pod_ip}:53"
            )
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
