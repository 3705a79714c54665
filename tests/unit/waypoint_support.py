"""A waypoint on loopback for tests: the test plays the source ztunnel (HBONE client with the
client's certificate) and the destination ztunnel (an HBONE server presenting the endpoints'
identity, mapping each endpoint to an in-process echo server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.mesh.ca import CertificateAuthority, Identity, IssuedCert
from testbed.mesh.config import LocalConfig
from testbed.mesh.hbone import (
    ConnectDecision,
    ConnectRequest,
    HboneClient,
    HboneServer,
    connect_tcp,
)
from testbed.mesh.waypoint.app import Settings, Waypoint
from testbed.mesh.waypoint.http1 import Http1Client
from testbed.mesh.waypoint.messages import HttpRequest, HttpResponse
from testbed.workloads import http_echo

TD = "cluster.local"
CLIENT = Identity(TD, "default", "client")
INTRUDER = Identity(TD, "other", "intruder")
REVIEWS = Identity(TD, "default", "reviews")
WAYPOINT = Identity(TD, "default", "waypoint")
CLIENT_ADDRESS = ("10.244.1.2", 40000)
INTRUDER_ADDRESS = ("10.244.1.3", 40000)
REVIEWS_VIP = "10.96.0.10:9080"
FLAKY_VIP = "10.96.0.13:9080"
# endpoint pod -> (pod ip, what answers there)
ENDPOINTS = {"r1": "10.244.2.2", "r2": "10.244.2.3", "broken": "10.244.2.4"}


def _workload(name: str, ip: str, identity: Identity, services: dict[str, Any]) -> dict[str, Any]:
    return {
        "uid": f"{identity.namespace}-{name}",
        "name": name,
        "namespace": identity.namespace,
        "serviceAccount": identity.service_account,
        "workloadIps": [ip],
        "protocol": "HBONE",
        "services": services,
    }


def _service(name: str, vip: str) -> dict[str, Any]:
    hostname = f"{name}.default.svc.cluster.local"
    return {"name": name, "namespace": "default", "hostname": hostname,
            "vips": [f"/{vip}"], "ports": {9080: 9080}}  # fmt: skip


def service_key(name: str) -> str:
    return f"default/{name}.default.svc.cluster.local"


def mesh_config() -> dict[str, Any]:
    """reviews (r1 v1, r2 v2), reviews-v1, reviews-v2, flaky (r1 + an always-503 pod)."""

    def member(*names: str) -> dict[str, Any]:
        return {service_key(n): {9080: 9080} for n in names}

    return {
        "workloads": [
            _workload("client", CLIENT_ADDRESS[0], CLIENT, {}),
            _workload("intruder", INTRUDER_ADDRESS[0], INTRUDER, {}),
            _workload("waypoint", "10.244.3.2", WAYPOINT, {}),
            _workload("r1", ENDPOINTS["r1"], REVIEWS, member("reviews", "reviews-v1", "flaky")),
            _workload("r2", ENDPOINTS["r2"], REVIEWS, member("reviews", "reviews-v2")),
            _workload("broken", ENDPOINTS["broken"], REVIEWS, member("flaky")),
        ],
        "services": [
            _service("reviews", "10.96.0.10"),
            _service("reviews-v1", "10.96.0.11"),
            _service("reviews-v2", "10.96.0.12"),
            _service("flaky", "10.96.0.13"),
        ],
    }


def local_config() -> LocalConfig:
    return LocalConfig.model_validate(mesh_config())


async def _always_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 6\r\n\r\nbroken")
            await writer.drain()
    writer.close()


@dataclass
class DestinationZtunnel:
    """The endpoints' side: CONNECT <pod ip>:9080 -> the in-process server standing for it."""

    apps: dict[str, tuple[str, int]]
    requests: list[ConnectRequest] = field(default_factory=list)

    async def on_connect(self, request: ConnectRequest) -> ConnectDecision:
        self.requests.append(request)
        app = self.apps.get(request.authority[0])
        if app is None or request.authority[1] != 9080:
            return ConnectDecision.reject(400)
        return ConnectDecision.accept(await connect_tcp(app))


@dataclass
class WaypointLab:
    waypoint: Waypoint
    destination: DestinationZtunnel
    certs: dict[Identity, IssuedCert]
    client: HboneClient

    async def connect(
        self, vip: str = REVIEWS_VIP, identity: Identity = CLIENT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A tunnel through the waypoint to `vip`, as the source ztunnel of `identity`."""
        source = CLIENT_ADDRESS if identity == CLIENT else INTRUDER_ADDRESS
        stream = await self.client.open(
            self.waypoint.hbone.address,
            vip,
            ssl_context=self.certs[identity].ssl_client_context(),
            expected_identities={WAYPOINT.uri},
            source_identity=identity.uri,
            source=source,
        )
        ours, theirs = socket.socketpair()
        asyncio.get_running_loop().create_task(stream.relay(theirs))
        return await asyncio.open_connection(sock=ours)

    async def http(self, vip: str = REVIEWS_VIP, identity: Identity = CLIENT) -> Http1Client:
        return Http1Client(*await self.connect(vip, identity))


def get(target: str, **headers: str) -> HttpRequest:
    return HttpRequest("GET", target, "reviews", list(headers.items()))


def served_by(response: HttpResponse) -> str | None:
    return dict(response.headers).get("x-served-by")


Started = asyncio.Queue[tuple[str, tuple[str, int]]]


async def _serve_echo(name: str, started: Started) -> None:
    await http_echo.serve(
        "127.0.0.1", 0, name, lambda port: started.put_nowait((name, ("127.0.0.1", port)))
    )


@asynccontextmanager
async def waypoint_lab(tmp: Path, l7: dict[str, Any]) -> AsyncIterator[WaypointLab]:
    ca = CertificateAuthority.create(TD)
    certs = {i: ca.issue(i) for i in (CLIENT, INTRUDER, REVIEWS, WAYPOINT)}
    certs[WAYPOINT].write(tmp / "waypoint-certs")
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(mesh_config()))
    (tmp / "l7.yaml").write_text(yaml.safe_dump(l7))
    started: Started = asyncio.Queue()
    tasks = [asyncio.create_task(_serve_echo(n, started)) for n in ("r1", "r2")]
    broken = await asyncio.start_server(_always_503, "127.0.0.1", 0)
    apps = {ENDPOINTS["broken"]: broken.sockets[0].getsockname()[:2]}
    for _ in tasks:
        name, address = await started.get()
        apps[ENDPOINTS[name]] = address
    destination = DestinationZtunnel(apps)
    dest_server = HboneServer(certs[REVIEWS].ssl_server_context(), destination.on_connect)
    await dest_server.start(socket.create_server(("127.0.0.1", 0)))
    settings = Settings(tmp / "mesh.yaml", tmp / "l7.yaml", tmp / "waypoint-certs",
                        "127.0.0.1", 0, 0, 0, 0)  # fmt: skip
    waypoint = Waypoint(settings, tunnel_address=lambda endpoint: dest_server.address)
    await waypoint.open()
    lab = WaypointLab(waypoint, destination, certs, HboneClient())
    try:
        yield lab
    finally:
        await lab.client.close()
        await waypoint.close()
        await dest_server.close()
        broken.close()
        for task in tasks:
            task.cancel()
