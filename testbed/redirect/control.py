"""The istiod role for the testbed: topology -> ztunnel local config, and workload certificates.

Istio's control plane pushes workloads, services and authorization policies to each ztunnel
over xDS and signs a certificate per workload identity. Here the same content is written to
files: one mesh config in ztunnel's local-config schema (testbed.mesh.config), shared by all
ztunnels, and per node a certificate folder holding one key pair per service account that has
a captured pod on that node (`<certs>/<namespace>/<service account>/`, Istio's file names).

Pods labelled `istio.io/dataplane-mode: none` are out of the mesh (protocol TCP): ztunnel
sends them plain TCP, and they are never enrolled. Each declared waypoint gets an L7 file
next to the mesh config (`waypoint-<name>.yaml`: the routes and L7 policies of the services
it serves, testbed.redirect.waypoint_config) and a key pair of its own identity.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from pathlib import Path

from testbed.cluster.model import (
    ROOT_NAMESPACE,
    PodSpec,
    PolicyRule,
    PolicySpec,
    ServiceSpec,
    Topology,
    service_endpoints,
)
from testbed.cluster.waypoints import WaypointSpec
from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN, CertificateAuthority, Identity
from testbed.mesh.config import Authorization, LocalConfig, RbacMatch, Service, Workload
from testbed.mesh.ztunnel.certs import identity_dir
from testbed.redirect.waypoint_config import app_protocols_of, attach_topology, l7_config_for

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
CONFIG_FILE = "mesh-config.yaml"


def is_captured(pod: PodSpec) -> bool:
    """Whether the pod is in the ambient mesh (Istio's per-pod opt-out label)."""
    return pod.labels.get(DATAPLANE_MODE_LABEL) != "none"


def identity_of(pod: PodSpec, trust_domain: str) -> Identity:
    return Identity(trust_domain, pod.namespace, pod.service_account)


# ---------------------------------------------------------------- policies


def _rbac_match(rule: PolicyRule) -> RbacMatch:
    # String matches take Istio's wildcard forms ("*", "prefix*", "*suffix") as they are.
    return RbacMatch.model_validate(
        {
            "principals": list(rule.principals),
            "notPrincipals": list(rule.not_principals),
            "namespaces": list(rule.namespaces),
            "notNamespaces": list(rule.not_namespaces),
            "sourceIps": list(rule.ip_blocks),
            "notSourceIps": list(rule.not_ip_blocks),
            "destinationPorts": list(rule.ports),
            "notDestinationPorts": list(rule.not_ports),
        }
    )


def _rule_clauses(rule: PolicyRule) -> list[list[RbacMatch]]:
    """A topology rule (all conditions must hold) as ztunnel clauses.

    A rule with no conditions matches every connection, as in Istio: no clauses at all. A
    match group that sets no field would never match, so it is only emitted when non-empty.
    """
    if rule == PolicyRule():
        return []
    return [[_rbac_match(rule)]]


def _scope(policy: PolicySpec) -> str:
    if policy.selector:
        return "WorkloadSelector"
    return "Global" if policy.namespace == ROOT_NAMESPACE else "Namespace"


def authorization_of(policy: PolicySpec) -> Authorization:
    return Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=_scope(policy),  # type: ignore[arg-type]
        action="Allow" if policy.action == "ALLOW" else "Deny",
        rules=[_rule_clauses(rule) for rule in policy.rules],
    )


def selected_policies(pod: PodSpec, policies: Iterable[PolicySpec]) -> list[str]:
    """Keys of the selector-scoped policies that select `pod` (root namespace: any namespace)."""
    keys = []
    for policy in policies:
        if not policy.selector:
            continue
        if policy.namespace not in (pod.namespace, ROOT_NAMESPACE):
            continue
        if all(pod.labels.get(k) == v for k, v in policy.selector.items()):
            keys.append(f"{policy.namespace}/{policy.name}")
    return keys


# ---------------------------------------------------------------- workloads and services


def workload_of(pod: PodSpec, topology: Topology, trust_domain: str, in_mesh: bool) -> Workload:
    services = {
        f"{svc.namespace}/{svc.hostname}": dict(svc.ports)
        for svc in topology.services.values()
        if pod in service_endpoints(topology, svc)
    }
    return Workload(
        uid=pod.uid,
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        trust_domain=trust_domain,
        workload_ips=[pod.ip],  # type: ignore[list-item]
        protocol="HBONE" if in_mesh else "TCP",
        node=pod.node,
        workload_name=pod.name,
        canonical_name=pod.labels.get("app", pod.name),
        canonical_revision=pod.labels.get("version", "latest"),
        authorization_policies=selected_policies(pod, topology.policies.values()),
        services=services,
    )


def service_of(svc: ServiceSpec, trust_domain: str, endpoints: list[PodSpec]) -> Service:
    return Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=svc.hostname,
        vips=[f"/{svc.vip}"],  # type: ignore[list-item]
        ports=dict(svc.ports),
        subject_alt_names=sorted({identity_of(p, trust_domain).uri for p in endpoints}),
    )


def mesh_config(
    topology: Topology,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    unenrolled: Collection[str] = (),
) -> LocalConfig:
    """Everything a ztunnel needs to know about a planned topology; pods named in
    `unenrolled` were taken out of the mesh although their labels put them in."""
    config = LocalConfig(
        workloads=[
            workload_of(p, topology, trust_domain, is_captured(p) and p.name not in unenrolled)
            for p in topology.pods.values()
        ],
        services=[
            service_of(s, trust_domain, service_endpoints(topology, s))
            for s in topology.services.values()
        ],
        policies=[authorization_of(p) for p in topology.policies.values()],
    )
    return attach_topology(config, topology)  # waypoints asked for by istio.io labels


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so a watcher never reads a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# ---------------------------------------------------------------- the control plane


class ControlPlane:
    """Writes the mesh config and issues certificates, into files under `directory`."""

    def __init__(self, directory: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.ca = CertificateAuthority.create(trust_domain)
        self.config_path = directory / CONFIG_FILE

    def waypoint_config_path(self, waypoint: str) -> Path:
        return self.directory / f"waypoint-{waypoint}.yaml"

    def files(self, topology: Topology) -> list[Path]:
        """Every file `write_config` writes for `topology`."""
        waypoints = [self.waypoint_config_path(s.name) for s in topology.l7.waypoints.values()]
        return [self.config_path, *waypoints]

    def write_config(self, topology: Topology, unenrolled: Collection[str] = ()) -> LocalConfig:
        """The mesh config, then each waypoint's L7 file; running proxies reload them."""
        config = mesh_config(topology, self.trust_domain, unenrolled)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.config_path, config.dump_yaml())
        declared = app_protocols_of(topology)
        for spec in topology.l7.waypoints.values():
            l7 = l7_config_for(spec, config, topology.l7, declared)
            write_atomically(self.waypoint_config_path(spec.name), l7.dump_yaml())
        return config

    def issue_waypoint_certs(self, spec: WaypointSpec, folder: Path) -> None:
        """The waypoint's own key pair (its service account is its name)."""
        self.ca.issue(Identity(self.trust_domain, spec.namespace, spec.name)).write(folder)

    def issue_node_certs(self, topology: Topology, node: str, certs_root: Path) -> list[Path]:
        """One key pair per identity of a captured pod on `node`; returns the folders."""
        identities = {
            identity_of(pod, self.trust_domain)
            for pod in topology.pods.values()
            if pod.node == node and is_captured(pod)
        }
        folders = []
        for identity in sorted(identities, key=str):
            folder = identity_dir(certs_root, identity)
            self.ca.issue(identity).write(folder)
            folders.append(folder)
        return folders
