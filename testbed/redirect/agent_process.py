"""The node's CNI agent as its own process, driven over a small control socket.

    python -m testbed.redirect.agent_process --zds-socket PATH --control-socket PATH
        [--snapshot FILE]

It runs a `CniAgent` (ZDS towards the node's ztunnel) and takes enroll/unenroll requests
as JSON lines on a unix stream socket, one request per connection:

    {"op": "enroll", "uid": ..., "name": ..., "namespace": ..., "service_account": ...,
     "netns": "/run/netns/..."}            -> {"error": ""}
    {"op": "unenroll", "uid": ...}         -> {"error": ""}

As a process of the run (recorded in its manifest), the agent outlives the command that
built the cluster, keeps the enrolled pods' namespaces open for ztunnel restarts, and is
stopped with the rest of the run. `AgentClient` is the caller's side.

A restarted agent is given the pods already in the mesh (`--snapshot`: a JSON list of
objects with the enroll request's fields), as Istio's agent lists them from the API server
before it serves ZDS: the reconnecting ztunnel gets them in its snapshot and keeps them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from testbed.mesh import zds
from testbed.netlab.errors import TestbedError
from testbed.redirect.cni_agent import CniAgent, ZdsError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
CONNECT_TIMEOUT = 10.0


class AgentError(TestbedError, RuntimeError):
    """The agent refused or failed a request, or cannot be reached."""


def handle(agent: CniAgent, request: dict[str, Any]) -> str:
    """Carry out one request; returns "" or an error message."""
    op = request.get("op")
    try:
        if op == "enroll":
            info = zds.WorkloadInfo(
                request["name"], request["namespace"], request["service_account"]
            )
            agent.enroll(request["uid"], info, request["netns"])
        elif op == "unenroll":
            agent.unenroll(request["uid"])
        else:
            return f"unknown op {op!r}"
    except KeyError as missing:
        return f"{op}: missing field {missing}"
    except (ZdsError, OSError) as exc:
        return f"{op} {request.get('uid')}: {exc}"
    return ""


def snapshot_entry(uid: str, info: zds.WorkloadInfo, netns_path: str) -> dict[str, str]:
    """One pod of a `--snapshot` file: the fields of its enroll request."""
    return {"uid": uid, "name": info.name, "namespace": info.namespace,
            "service_account": info.service_account, "netns": netns_path}  # fmt: skip


def restore_snapshot(agent: CniAgent, path: str) -> None:
    """The pods a `--snapshot` file names, known to the agent before it serves ZDS."""
    with open(path, encoding="utf-8") as source:
        pods = json.load(source)
    for pod in pods:
        info = zds.WorkloadInfo(pod["name"], pod["namespace"], pod["service_account"])
        try:
            agent.restore(pod["uid"], info, pod["netns"])
        except OSError as exc:  # the pod went away meanwhile: nothing to hand over
            log.warning("snapshot: pod %s skipped: %s", pod["uid"], exc)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def serve(agent: CniAgent, control_path: str) -> None:
    """Answer control requests until SIGTERM/SIGINT."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under another name and renamed once listening: a client that sees the path
    # can connect at once.
    partial = control_path + ".partial"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    listener.bind(partial)
    listener.listen(16)
    os.replace(partial, control_path)
    with listener:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    request = json.loads(_read_line(conn))
                    error = handle(agent, request) if isinstance(request, dict) else "not an object"
                except ValueError as exc:
                    error = f"bad request: {exc}"
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"error": error}).encode() + b"\n")


class AgentClient:
    """Talks to an agent process; the same enroll/unenroll calls as a CniAgent."""

    def __init__(self, control_path: str | Path) -> None:
        self.control_path = str(control_path)

    def wait_listening(self, timeout: float = CONNECT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.control_path):
            if time.monotonic() > deadline:
                raise AgentError(f"no agent listening on {self.control_path} after {timeout} s")
            time.sleep(0.02)

    def _request(self, request: dict[str, str]) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(CONNECT_TIMEOUT + 5)
                sock.connect(self.control_path)
                sock.sendall(json.dumps(request).encode() + b"\n")
                answer = json.loads(_read_line(sock) or b"{}")
        except (OSError, ValueError) as exc:
            raise AgentError(f"agent at {self.control_path}: {exc}") from exc
        error = answer.get("error", "no answer")
        if error:
            raise AgentError(error)

    def enroll(self, uid: str, info: zds.WorkloadInfo, netns_path: str) -> None:
        self._request({"op": "enroll", **snapshot_entry(uid, info, netns_path)})

    def unenroll(self, uid: str) -> None:
        self._request({"op": "unenroll", "uid": uid})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testbed.redirect.agent_process")
    parser.add_argument("--zds-socket", required=True)
    parser.add_argument("--control-socket", required=True)
    parser.add_argument("--snapshot", help="JSON list of the pods already enrolled")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s cni-agent %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    agent = CniAgent(args.zds_socket)
    if args.snapshot:
        restore_snapshot(agent, args.snapshot)
    agent.start()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            serve(agent, args.control_socket)
    finally:
        agent.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.control_socket)


if __name__ == "__main__":
    main()
