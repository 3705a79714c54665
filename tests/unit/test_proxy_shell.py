"""The proxy shell: connection records and their /connections schema, the admin endpoints
(admin on localhost only), config reload, and policy re-checks of open connections."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.cluster import Topology, plan
from testbed.mesh.authz import CompiledPolicies, ConnectionFacts
from testbed.mesh.ca import Identity
from testbed.mesh.config import ConfigError, LocalConfig
from testbed.mesh.metrics import Registry
from testbed.mesh.proxy.connections import ConnectionLog
from testbed.mesh.proxy.http import respond
from testbed.mesh.proxy.shell import AdminPorts, ProxyProcess
from testbed.mesh.proxy.watch import Watched, watch
from testbed.mesh.ztunnel.enforce import OpenConnection, OpenConnections
from testbed.mesh.ztunnel.outbound import baggage, forwarded
from testbed.redirect.control import mesh_config

SCHEMA: dict[str, type | tuple[type, ...]] = {
    "id": int,
    "proxy": str,
    "listener": int,
    "direction": str,
    "peer": str,
    "original_dst": str,
    "src_identity": (str, type(None)),
    "dst_identity": (str, type(None)),
    "connect_target": (str, type(None)),
    "upstream": (str, type(None)),
    "path": str,
    "verdict": str,
    "reason": (str, type(None)),
    "bytes_sent": int,
    "bytes_received": int,
    "opened": float,
    "closed": (float, type(None)),
}


def test_records_follow_the_connections_schema_and_since() -> None:
    clock = iter([100.0, 101.0, 102.5, 103.0])
    log = ConnectionLog("ztunnel", clock=lambda: next(clock))
    first = log.open(
        listener=15001,
        direction="outbound",
        peer=("10.0.0.1", 4000),
        original_dst=("10.96.0.1", 80),
        path="hbone",
        src_identity="spiffe://a",
        dst_identity="spiffe://b",
        connect_target="10.0.0.2:8080",
        upstream=("10.0.0.2", 15008),
    )
    second = log.open(
        listener=15006,
        direction="inbound",
        peer=("fd00::1", 5000),
        original_dst=("10.0.0.2", 8080),
        path="plaintext",
    )
    log.close(first, sent=10, received=20)
    log.refuse(second, "denied by default/deny")
    body = json.loads(log.render({}))
    records = body["connections"]
    assert [r["id"] for r in records] == [1, 2]
    for record in records:
        assert set(record) == set(SCHEMA)
        for key, kind in SCHEMA.items():
            assert isinstance(record[key], kind), key
    assert records[0] | {} == {
        "id": 1,
        "proxy": "ztunnel",
        "listener": 15001,
        "direction": "outbound",
        "peer": "10.0.0.1:4000",
        "original_dst": "10.96.0.1:80",
        "src_identity": "spiffe://a",
        "dst_identity": "spiffe://b",
        "connect_target": "10.0.0.2:8080",
        "upstream": "10.0.0.2:15008",
        "path": "hbone",
        "verdict": "allow",
        "reason": None,
        "bytes_sent": 10,
        "bytes_received": 20,
        "opened": 100.0,
        "closed": 102.5,
    }
    assert records[1]["peer"] == "[fd00::1]:5000"
    assert (records[1]["verdict"], records[1]["reason"]) == ("deny", "denied by default/deny")
    assert [r["id"] for r in json.loads(log.render({"since": "1"}))["connections"]] == [2]
    with pytest.raises(ValueError, match="since"):
        log.render({"since": "x"})


def test_the_log_keeps_the_last_thousand() -> None:
    log = ConnectionLog("waypoint")
    for _ in range(1005):
        log.open(listener=15008, direction="inbound", peer=None, original_dst=None, path="l7")
    ids = [r.id for r in log.since()]
    assert len(ids) == 1000 and ids[0] == 6 and ids[-1] == 1005


class Toy(ProxyProcess):
    def config_dump(self) -> dict[str, Any]:
        return {"toy": True}


def test_admin_routes_and_where_they_listen() -> None:
    proxy = Toy(Registry(), ConnectionLog("sidecar"))
    endpoints = proxy.endpoints()
    assert endpoints["admin"][:2] == ("127.0.0.1", 15000)  # as Istio: localhost only
    assert endpoints["metrics"][:2] == ("0.0.0.0", 15020)
    assert endpoints["ready"][:2] == ("0.0.0.0", 15021)
    admin = endpoints["admin"][2]
    dump = respond(b"GET /config_dump HTTP/1.1\r\n\r\n", admin)
    assert json.loads(dump.body) == {"toy": True}
    assert json.loads(respond(b"GET /connections HTTP/1.1\r\n\r\n", admin).body) == {
        "connections": []
    }
    assert respond(b"GET /connections?since=no HTTP/1.1\r\n\r\n", admin).status == 400
    ready = endpoints["ready"][2]
    assert respond(b"GET /healthz/ready HTTP/1.1\r\n\r\n", ready).status == 503
    proxy.ready = True
    assert respond(b"GET /healthz/ready HTTP/1.1\r\n\r\n", ready).status == 200


def test_shell_serves_and_closes_its_endpoints() -> None:
    async def scenario() -> tuple[bytes, bool]:
        proxy = Toy(
            Registry(), ConnectionLog("ztunnel"), AdminPorts(0, 0, 0, "127.0.0.1", "127.0.0.1")
        )
        await proxy.open()
        reader, writer = await asyncio.open_connection(*proxy.address("admin"))
        writer.write(b"GET /connections HTTP/1.1\r\n\r\n")
        answer = await reader.read()
        writer.close()
        address = proxy.address("ready")
        await proxy.close()
        try:
            await asyncio.open_connection(*address)
        except ConnectionRefusedError:
            return answer, True
        return answer, False

    answer, refused_after = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'{"connections": []}')
    assert refused_after


def test_watch_reloads_valid_changes_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("1")
    seen: list[int] = []

    def load(p: Path) -> int:
        text = p.read_text()
        if not text.isdigit():
            raise ConfigError(f"{p}: not a number")
        return int(text)

    async def scenario() -> None:
        task = asyncio.create_task(watch(Watched(path, load, seen.append), interval=0.01))
        for text in ("oops", "22", "333"):
            await asyncio.sleep(0.05)
            path.write_text(text)
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    assert seen == [22, 333]


class Pods(Topology):
    def build(self) -> None:
        self.add_node("n1")
        self.add_pod("client", "n1")
        self.add_pod("server", "n1", labels={"app": "server"})


def test_a_policy_change_closes_the_open_connections_it_denies() -> None:
    client = Identity("cluster.local", "default", "client")
    other = Identity("cluster.local", "default", "other")
    topology = plan(Pods())
    server = topology.pods["server"]
    closed: list[str] = []
    log = ConnectionLog("ztunnel")
    open_ = OpenConnections()
    for name, identity in (("client", client), ("other", other)):
        facts = ConnectionFacts(identity, "10.0.0.1", server.ip, 8080)
        record = log.open(
            listener=15008,
            direction="inbound",
            peer=("10.0.0.1", 1),
            original_dst=("10.0.0.2", 8080),
            path="hbone",
        )
        open_.add(OpenConnection(server.uid, facts, functools.partial(closed.append, name), record))
    unchanged = mesh_config(topology)
    assert open_.recheck(unchanged, CompiledPolicies.from_config(unchanged)) == []
    topology.add_policy(
        "deny-client",
        action="DENY",
        selector={"app": "server"},
        rules=[{"principals": [client.principal]}],
    )
    deny = mesh_config(topology)
    denied = open_.recheck(deny, CompiledPolicies.from_config(deny))
    assert closed == ["client"] and len(denied) == 1 and len(open_) == 1
    record = log.since()[0]
    assert record.verdict == "deny" and "policy change" in (record.reason or "")
    assert open_.recheck(deny, CompiledPolicies.from_config(deny)) == []  # closed once


def test_baggage_and_forwarded_as_istio_writes_them() -> None:
    workload = LocalConfig.model_validate(
        {
            "workloads": [
                {
                    "uid": "u",
                    "name": "client-7f9",
                    "namespace": "shop",
                    "workloadIps": ["10.0.0.1"],
                    "workloadName": "client",
                    "workloadType": "deployment",
                    "canonicalName": "client",
                    "canonicalRevision": "v1",
                    "clusterId": "east",
                }
            ]
        }
    ).workloads[0]
    assert baggage(workload) == (
        "k8s.cluster.name=east,k8s.namespace.name=shop,k8s.deployment.name=client,"
        "service.name=client,service.version=v1"
    )
    bare = workload.model_copy(update={"canonical_name": "", "canonical_revision": ""})
    assert "service.name" not in baggage(bare) and "service.version" not in baggage(bare)
    service = LocalConfig.model_validate(
        {
            "services": [
                {
                    "name": "web",
                    "namespace": "shop",
                    "hostname": "web.shop.svc.cluster.local",
                    "vips": ["/10.96.0.1"],
                    "ports": {80: 8080},
                }
            ]
        }
    ).services[0]
    assert forwarded(("10.0.0.1", 4000), service) == (
        'for="10.0.0.1:4000";host=web.shop.svc.cluster.local'
    )
    assert forwarded(("fd00::1", 4000), None) == 'for="[fd00::1]:4000"'


COMMANDS = {
    "testbed.mesh.ztunnel": ["--zds-socket", "/nonexistent.sock"],
    "testbed.mesh.ztunnel.shared": ["--ztunnel-ip", "10.0.0.9", "--same-node-fast-path", "on"],
    "testbed.mesh.ztunnel.sidecar": ["--uid", "default-x"],
}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_each_ztunnel_command_line_names_a_bad_config_in_one_line(
    module: str, tmp_path: Path
) -> None:
    bad = tmp_path / "mesh.yaml"
    bad.write_text("workloads: [{namespace: default}]\n")  # no workloadIps
    argv = ["--config", str(bad), "--certs", str(tmp_path), "--node", "n1", *COMMANDS[module]]
    result = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_waypoint_command_line_names_a_missing_certificate_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text("{}\n")
    (tmp_path / "l7.yaml").write_text("{}\n")
    argv = ["--mesh-config", str(tmp_path / "mesh.yaml"), "--l7-config", str(tmp_path / "l7.yaml"),
            "--certs", str(tmp_path / "none")]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "testbed.mesh.waypoint", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cert-chain.pem" in result.stderr
