"""What every connection handler of a ztunnel consults: the current mesh config (replaced
as a whole on reload, so a handler sees one consistent version), compiled policies,
certificates, metrics, connection records, the open inbound connections policy changes
re-check, and the round-robin position per service port."""

from __future__ import annotations

import hashlib
import itertools
import logging

from testbed.mesh.authz import CompiledPolicies
from testbed.mesh.config import LocalConfig, Service, Workload
from testbed.mesh.metrics import Registry, TcpMetrics
from testbed.mesh.proxy.connections import ConnectionLog, ProxyKind
from testbed.mesh.ztunnel.certs import CertStore
from testbed.mesh.ztunnel.enforce import OpenConnections

log = logging.getLogger(__name__)


def config_digest(config: LocalConfig) -> str:
    """Identifies a config by content; the control plane compares it to what it wrote."""
    return hashlib.sha256(config.dump_yaml().encode()).hexdigest()


class MeshState:
    def __init__(
        self, config: LocalConfig, certs: CertStore, node: str, proxy: ProxyKind = "ztunnel"
    ) -> None:
        self.certs = certs
        self.node = node
        self.registry = Registry()
        self.metrics = TcpMetrics.register(self.registry)
        self.connections = ConnectionLog(proxy)
        self.open_inbound = OpenConnections()
        self._turns: dict[tuple[str, int], itertools.count[int]] = {}
        self.config = config
        self.policies = CompiledPolicies.from_config(config)
        self.digest = config_digest(config)

    def update(self, config: LocalConfig) -> None:
        """Take a new config; open inbound connections its policies deny are closed."""
        policies = CompiledPolicies.from_config(config)
        self.config, self.policies, self.digest = config, policies, config_digest(config)
        for connection, decision in self.open_inbound.recheck(config, policies):
            facts = connection.facts
            log.info(
                "closed %s -> %s:%d: %s (%s)",
                facts.source_ip,
                facts.destination_ip,
                facts.destination_port,
                decision.reason,
                decision.policy,
            )

    def pick(self, service: Service, port: int) -> tuple[Workload, int] | None:
        """The next healthy endpoint of `service` for `port` (round-robin), with its target
        port; None when it has none."""
        endpoints = self.config.endpoints(service, port)
        if not endpoints:
            return None
        turn = next(self._turns.setdefault((service.key, port), itertools.count()))
        return endpoints[turn % len(endpoints)]
