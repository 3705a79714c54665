"""The cluster DNS service of every testbed, whatever the mode (kube-dns / CoreDNS's job).

A system pod kube-system/coredns runs our DNS server (testbed.mesh.dns) on port 53; a
Service VIP in the service range reaches it through kube-proxy's DNAT (UDP and TCP), and
every pod's resolv.conf names that VIP. It answers `<svc>.<ns>.svc.cluster.local` for the
topology's services and NXDOMAIN for anything else: no query leaves the testbed.

Kubernetes gives kube-dns 10.96.0.10 by convention; here the topology's services are
numbered from .10 on, so the DNS service takes .2 in the same range.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import dns.exception
import dns.message
import dns.query
import dns.rcode

from testbed.cluster.model import ServiceSpec
from testbed.mesh.dns import PORT, Zone
from testbed.netlab import ManagedProcess
from testbed.netlab.errors import TestbedError

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster, Pod

DNS_SERVICE_VIP = "10.96.0.2"
DNS_POD = "coredns"
DNS_NAMESPACE = "kube-system"
READY_TIMEOUT = 10.0


class ClusterDnsError(TestbedError, RuntimeError):
    """The cluster DNS server did not come up."""


def service_zone(services: Iterable[ServiceSpec]) -> Zone:
    return Zone({svc.hostname: svc.vip for svc in services})


def start_cluster_dns(cluster: Cluster, node: str) -> tuple[Pod, ManagedProcess]:
    """The DNS pod on `node`, answering once this returns."""
    pod = cluster.add_system_pod(
        node,
        DNS_POD,
        namespace=DNS_NAMESPACE,
        service_account=DNS_POD,
        labels={"k8s-app": "kube-dns"},
    )
    config = cluster.workdir / "cluster-dns.json"
    config.write_text(json.dumps(service_zone(cluster.services.values()).to_json()), "utf-8")
    argv = [
        sys.executable,
        "-m",
        "testbed.mesh.dns",
        "--config",
        str(config),
        "--listen",
        f"{pod.ip}:{PORT}",
    ]
    process = pod.spawn(argv, label="dns")
    wait_answering(pod, process)
    return pod, process


def wait_answering(pod: Pod, process: ManagedProcess) -> None:
    """Until a query to the pod's port 53 gets a reply (NXDOMAIN is a reply)."""
    query = dns.message.make_query("ready.invalid.", "A")
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterDnsError(
                f"cluster DNS exited with {process.returncode}: {process.output()}"
            )
        try:
            with pod.netns.entered():
                reply = dns.query.udp(query, pod.ip, timeout=0.3)
            if reply.rcode() == dns.rcode.NXDOMAIN:
                return
        except (dns.exception.DNSException, OSError):
            time.sleep(0.05)
    raise ClusterDnsError(f"cluster DNS on {pod.ip}:{PORT} did not answer in {READY_TIMEOUT} s")
