"""Issue 15 item 5: apps declared in topologies run from `up` to `down`, a crashing one is
reported by `inspect` (not hidden, not restarted), and the shell's `curl` reaches them."""

import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from testbed.netlab.process import is_same_process

TESTBED = [sys.executable, "-m", "testbed.cli"]
TOPOLOGY = f"{Path(__file__).with_name('topo_apps.py')}:apps"
RUNNING = {"web": "http-echo", "perf": "iperf3", "rr": "sockperf", "listener": "command"}


def cli(root: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TESTBED, "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        input=input,
    )


def inspect_json(root: Path, name: str) -> dict[str, Any]:
    done = cli(root, "inspect", name, "--json")
    assert done.returncode == 0, done.stderr
    inv: dict[str, Any] = json.loads(done.stdout)
    return inv


def inspect_apps(root: Path, name: str) -> dict[str, dict[str, Any]]:
    return {app["pod"]: app for app in inspect_json(root, name)["apps"]}


def test_declared_apps_run_from_up_to_down_and_a_crash_is_reported(runs_root: Path) -> None:
    name = "a" + uuid.uuid4().hex[:7]
    up = cli(runs_root, "up", TOPOLOGY, "--name", name, "--detach")
    assert up.returncode == 0, up.stderr
    try:
        apps = inspect_apps(runs_root, name)
        assert set(apps) == {*RUNNING, "crasher"}
        for pod, kind in RUNNING.items():
            assert apps[pod]["app"] == kind and apps[pod]["state"] == "running", apps[pod]
            assert is_same_process(apps[pod]["pid"], apps[pod]["start_time"])
        deadline = time.monotonic() + 10.0  # the crasher may still be ending as `up` returns
        while apps["crasher"]["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            apps = inspect_apps(runs_root, name)
        crashed = apps["crasher"]
        assert crashed["state"] == "exited" and crashed["exit_code"] == 3, crashed
        assert crashed["output"].splitlines() == ["about to fail", "second line"]
        text = cli(runs_root, "inspect", name)
        assert "exited 3" in text.stdout and "second line" in text.stdout, text.stdout
        web_ip = next(p["ip"] for p in inspect_json(runs_root, name)["pods"] if p["name"] == "web")
        served = cli(runs_root, "exec", name, "client", "--", "curl", "-sSi", f"{web_ip}:8080")
        assert "HTTP/1.1 200" in served.stdout and "x-served-by: web" in served.stdout
        again = inspect_apps(runs_root, name)["crasher"]
        assert again["pid"] == crashed["pid"] and again["state"] == "exited"  # not restarted
    finally:
        down = cli(runs_root, "down", name)
    assert down.returncode == 0, down.stderr
    for pod in RUNNING:
        assert ended(apps[pod]["pid"], apps[pod]["start_time"]), pod


def ended(pid: int, start_time: int, timeout: float = 5.0) -> bool:
    """Whether the process is gone (or a zombie its new parent, init, has yet to reap)."""
    deadline = time.monotonic() + timeout
    while is_same_process(pid, start_time):
        with contextlib.suppress(FileNotFoundError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_shell_curl_resolves_pod_and_service_names(runs_root: Path) -> None:
    typed = "curl client http://web:8080/hello\nclient curl http://front/\napps\nexit\n"
    done = cli(runs_root, "up", TOPOLOGY, "--name", "a" + uuid.uuid4().hex[:7], input=typed)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("HTTP/1.1 200") == 2, out  # the pod by name, then the service on port 80
    assert out.count("x-served-by: web") == 2, out
    assert "exited 3" in out  # the `apps` table


def test_reviews_answer_through_the_waypoint_in_inpod(runs_root: Path) -> None:
    """topologies/reviews_waypoint.py's own instructions, verbatim."""
    typed = (
        "curl productpage http://reviews:9080/\n"
        "curl productpage http://reviews:9080/v2/x\n"
        "curl productpage http://reviews:9080/admin\n"
        "exit\n"
    )
    name = "a" + uuid.uuid4().hex[:7]
    done = cli(runs_root, "up", "reviews_waypoint", "--mode", "inpod", "--name", name, input=typed)
    assert done.returncode == 0, done.stderr
    replies = done.stdout.split("HTTP/1.1 ")[1:]
    assert len(replies) == 3, done.stdout
    assert replies[0].startswith("200") and "x-served-by: reviews-v" in replies[0], replies[0]
    assert replies[1].startswith("200") and "x-served-by: reviews-v2" in replies[1], replies[1]
    assert replies[2].startswith("403") and "RBAC: access denied" in replies[2], replies[2]


def test_the_readme_tour_works_verbatim(runs_root: Path) -> None:
    """README "A tour" on two_nodes (its `client ping server2` pings until Ctrl-C, as in
    Mininet: `ping A B` pings 3 times): the declared apps (HTTP echo on port 80) leave the
    ports of the shell's `iperf` free."""
    typed = "ping client server2\niperf client server2\ncurl client http://server2/\nexit\n"
    done = cli(runs_root, "up", "two_nodes", "--name", "a" + uuid.uuid4().hex[:7], input=typed)
    assert done.returncode == 0, done.stderr
    assert "3 received" in done.stdout, done.stdout
    assert "throughput" in done.stdout, done.stdout
    assert "HTTP/1.1 200" in done.stdout and "x-served-by: server2" in done.stdout, done.stdout
