"""Istio resources applied to a running testbed: `testbed apply` / `testbed delete`.

Two ways in:

- `apply_to_cluster(cluster, resources)`, for the process that holds the Cluster (a
  topology script, the shell): declarations change in `cluster.topology`, pods whose
  `istio.io/dataplane-mode` changed are enrolled or unenrolled through the mode, and the mode's
  `update_policies` pushes the rest.
- `apply_to_run(run, path)` / `delete_from_run(run, path)`, for a testbed left running with
  `testbed up --detach`: the topology is rebuilt from the run's inventory (its name and
  parameters), the resources applied so far are replayed from the run's state file, and the
  control plane's mesh config and the waypoints' L7 files are rewritten in the run's mesh
  folder; the proxies reload them, and the call returns once every ztunnel or sidecar reports
  the new config's digest. What needs the building process's handles (enrolling a pod after a
  dataplane-mode change, starting a new waypoint) is refused there, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from testbed.cluster.loader import load_topology
from testbed.cluster.model import Topology, TopologyError, plan
from testbed.kube import istio
from testbed.kube import resources as r
from testbed.kube.documents import load_documents, parse_document
from testbed.netlab import NetlabError
from testbed.netlab.manifest import RUNS_ROOT

if TYPE_CHECKING:
    from testbed.cluster.cluster import Cluster

APPLIED_STATE = "istio-applied.yaml"
MESH_FOLDER = "mesh"
ADMIN_PORT = 15000
CONFIG_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


# ---------------------------------------------------------------- in the building process


def apply_to_cluster(
    cluster: Cluster, resources: list[r.IstioResource], *, delete: bool = False
) -> None:
    topology = cluster.topology
    from testbed.redirect.control import is_captured

    before = {name: is_captured(pod) for name, pod in topology.pods.items()}
    for resource in resources:
        if delete:
            istio.withdraw(topology, resource)
        else:
            istio.declare(topology, resource)
    for name, pod in topology.pods.items():
        now = is_captured(pod)
        if now != before[name]:
            (cluster.mode.enroll if now else cluster.mode.unenroll)(cluster.pod(name))
    cluster.mode.update_policies(topology)


# ---------------------------------------------------------------- a detached testbed


@dataclass
class RunningTestbed:
    run: str
    root: Path
    inventory: dict[str, Any]

    @classmethod
    def open(cls, run: str, root: Path = RUNS_ROOT) -> RunningTestbed:
        from testbed.cluster.cluster import load_inventory

        try:
            inventory = load_inventory(run, root)
        except NetlabError as exc:
            raise istio.ApplyError(str(exc)) from None
        if inventory["facts"].get("mode") == "none":
            raise istio.ApplyError(
                f"testbed {run} runs mode none: no proxy enforces Istio resources there"
            )
        return cls(run, root, inventory)

    @property
    def folder(self) -> Path:
        return self.root / self.run

    def history(self) -> list[dict[str, Any]]:
        path = self.folder / APPLIED_STATE
        if not path.exists():
            return []
        loaded: list[dict[str, Any]] = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        return loaded

    def topology(self, history: list[dict[str, Any]]) -> Topology:
        """The topology as built, with every apply and delete of `history` replayed."""
        name = self.inventory["topology"]
        try:
            topology = plan(load_topology(name, **self.inventory["params"]))
        except TopologyError as exc:
            raise istio.ApplyError(
                f"testbed {self.run}: its topology {name!r} cannot be loaded again ({exc}); "
                "apply needs a testbed built from a topology name or file"
            ) from None
        for entry in history:
            resource, errors = parse_document(entry["document"])
            if resource is None or errors:
                raise istio.ApplyError(f"{self.folder / APPLIED_STATE}: corrupt entry: {errors}")
            if entry["op"] == "apply":
                istio.declare(topology, resource)
            else:
                istio.withdraw(topology, resource)
        return topology

    def change(self, path: Path, op: str) -> list[r.IstioResource]:
        resources = load_documents(path)
        history = self.history()
        topology = self.topology(history)
        for resource in resources:
            self._check_runtime(topology, resource, op)
            if op == "apply":
                istio.declare(topology, resource)
            else:
                istio.withdraw(topology, resource)
        try:
            self.push(topology)
        except istio.ApplyError:
            with contextlib.suppress(istio.ApplyError):
                self.push(self.topology(history))  # put back what ran before
            raise
        history += [{"op": op, "document": res.dump()} for res in resources]
        state = self.folder / APPLIED_STATE
        state.write_text(yaml.safe_dump(history, sort_keys=False), encoding="utf-8")
        return resources

    def _check_runtime(self, topology: Topology, resource: r.IstioResource, op: str) -> None:
        meta = resource.metadata
        where = f"{resource.kind} {meta.namespace or 'default'}/{meta.name}"
        new_waypoint = f"{meta.namespace}/{meta.name}" not in istio.waypoint_keys(topology)
        if isinstance(resource, r.Gateway) and op == "apply" and new_waypoint:
            raise istio.ApplyError(
                f"{where}: a new waypoint cannot be started in a running testbed; declare it "
                "in the topology (add_waypoint or apply_yaml in build())"
            )
        if isinstance(resource, r.LabelPatch) and istio.DATAPLANE_MODE in resource.metadata.labels:
            raise istio.ApplyError(
                f"{where}: metadata.labels.{istio.DATAPLANE_MODE}: enrolling or unenrolling pods "
                "needs the process that built the testbed (testbed up's shell, or "
                "apply_to_cluster in a script); not possible on a detached testbed"
            )

    def push(self, topology: Topology) -> None:
        """Write the mesh config and the waypoints' L7 files; wait for every proxy to load it."""
        from testbed.mesh.ca import DEFAULT_TRUST_DOMAIN
        from testbed.mesh.ztunnel.state import config_digest
        from testbed.redirect.control import CONFIG_FILE, mesh_config, write_atomically
        from testbed.redirect.waypoint_config import app_protocols_of, l7_config_for

        trust_domain = self.inventory["facts"].get("trust_domain", DEFAULT_TRUST_DOMAIN)
        config = mesh_config(topology, trust_domain)
        mesh, declared = self.folder / MESH_FOLDER, app_protocols_of(topology)
        for spec in topology.l7.waypoints.values():
            path = mesh / f"waypoint-{spec.name}.yaml"
            if path.exists():  # the mode runs this waypoint (and owns the file)
                l7 = l7_config_for(spec, config, topology.l7, declared)
                write_atomically(path, l7.dump_yaml())
        write_atomically(mesh / CONFIG_FILE, config.dump_yaml())
        self._await_digest(config_digest(config))

    def _await_digest(self, digest: str) -> None:
        deadline = time.monotonic() + CONFIG_TIMEOUT
        for pod in self.inventory["pods"]:
            while (seen := _config_digest(pod["netns"])) not in (None, digest):
                if time.monotonic() > deadline:
                    raise istio.ApplyError(
                        f"the proxy in pod {pod['name']} did not load the new config within "
                        f"{CONFIG_TIMEOUT} s (it reports {seen})"
                    )
                time.sleep(POLL_INTERVAL)


def _config_digest(netns_name: str) -> str | None:
    """The config digest the proxy of a pod's namespace reports; None: no proxy answers."""
    from testbed.netlab import Netns

    try:
        with Netns(netns_name).entered():
            sock = socket.create_connection(("127.0.0.1", ADMIN_PORT), timeout=2.0)
        with sock:
            sock.sendall(
                b"GET /config_dump HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0] + b" ":
        return None
    try:
        digest = json.loads(body).get("configDigest")
    except (ValueError, AttributeError):
        return None
    return str(digest) if digest is not None else None


def apply_to_run(run: str, path: Path, root: Path = RUNS_ROOT) -> list[r.IstioResource]:
    return RunningTestbed.open(run, root).change(path, "apply")


def delete_from_run(run: str, path: Path, root: Path = RUNS_ROOT) -> list[r.IstioResource]:
    return RunningTestbed.open(run, root).change(path, "delete")
