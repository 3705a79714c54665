"""What every connection handler of a ztunnel consults: the current mesh config (replaced
as a whole on reload, so a handler sees one consistent version), compiled policies,
certificates, metrics, and the round-robin position per service port."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from testbed.mesh.authz import CompiledPolicies
from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.metrics import Registry, TcpMetrics
from testbed.mesh.ztunnel import HBONE_PORT
from testbed.mesh.ztunnel.certs import CertStore


def config_digest(config: LocalConfig) -> str:
    """Identifies a config by content; the control plane compares it to what it wrote."""
    return hashlib.sha256(config.dump_yaml().encode()).hexdigest()


@dataclass(frozen=True)
class Hop:
    """Where an HBONE connection goes (`<ip>:15008`) and the identities expected there
    (empty: any identity of the trust domain)."""

    address: tuple[str, int]
    identities: frozenset[str]


@dataclass(frozen=True)
class Route:
    """Where an outbound connection goes: `target` (the CONNECT authority, or where plain
    TCP goes), the destination workload (None when unknown or behind a service waypoint),
    the service whose VIP was dialled, and the HBONE hop (None: plain TCP passthrough)."""

    target: tuple[str, int]
    workload: Workload | None
    service: Service | None = None
    via: Hop | None = None

    @property
    def in_mesh(self) -> bool:
        return self.via is not None


class MeshState:
    def __init__(self, config: LocalConfig, certs: CertStore, node: str) -> None:
        self.certs = certs
        self.node = node
        self.registry = Registry()
        self.metrics = TcpMetrics.register(self.registry)
        self._turns: dict[tuple[str, int], itertools.count[int]] = {}
        self.config = config
        self.policies = CompiledPolicies.from_config(config)
        self.digest = config_digest(config)

    def update(self, config: LocalConfig) -> None:
        policies = CompiledPolicies.from_config(config)
        self.config, self.policies, self.digest = config, policies, config_digest(config)

    def route(self, ip: str, port: int) -> Route | None:
        """Resolve a destination. A service VIP goes to the service's waypoint if it has one
        (keeping the VIP as the target), else to an endpoint picked round-robin (None when
        none is healthy); a pod with a waypoint goes through it; other addresses as they are.
        """
        config = self.config
        service = config.service_by_vip(ip, port)
        if service is None:
            workload = config.workload_by_ip(ip)
            waypoint = config.waypoint_for_workload(workload) if workload else None
            via = self._hop_to(*waypoint) if waypoint else self._direct_hop(workload)
            return Route((ip, port), workload, None, via)
        waypoint = config.waypoint_for_service(service)
        if waypoint is not None:
            return Route((ip, port), None, service, self._hop_to(*waypoint))
        picked = self._pick(service, port)
        if picked is None:
            return None
        workload, target = picked
        address = (str(workload.workload_ips[0]), target)
        return Route(address, workload, service, self._direct_hop(workload))

    def _pick(self, service: Service, port: int) -> tuple[Workload, int] | None:
        endpoints = self.config.endpoints(service, port)
        if not endpoints:
            return None
        turn = next(self._turns.setdefault((service.key, port), itertools.count()))
        return endpoints[turn % len(endpoints)]

    @staticmethod
    def _direct_hop(workload: Workload | None) -> Hop | None:
        if workload is None or workload.protocol != "HBONE":
            return None
        ip = str(workload.workload_ips[0])
        return Hop((ip, HBONE_PORT), frozenset({workload.identity.uri}))

    def _hop_to(self, ip: str, port: int) -> Hop:
        """A waypoint's HBONE address: a service VIP resolves to one of its pods."""
        service = self.config.service_by_vip(ip, port)
        picked = self._pick(service, port) if service is not None else None
        if picked is not None:
            pod, target = picked
            return Hop((str(pod.workload_ips[0]), target), frozenset({pod.identity.uri}))
        known = self.config.workload_by_ip(ip)
        return Hop((ip, port), frozenset({known.identity.uri}) if known else frozenset())
