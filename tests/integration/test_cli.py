"""Issue #2: the command line: bad input, interrupts, crashes and `clean`."""

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hoststate import netns_of_run, root_namespace_state

from testbed.netlab import nsutil

TESTBED = [sys.executable, "-m", "testbed.cli"]
BROKEN = str(Path(__file__).with_name("topo_broken.py"))


def cli(root: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TESTBED, "--root", str(root), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def fresh_name() -> str:
    return "t" + uuid.uuid4().hex[:7]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "nosuch"], "unknown topology 'nosuch'"),
        (["up", "multi_node,nodes"], "is not of the form key=value"),
        (["up", "two_nodes", "--mode", "warp"], "unknown mode 'warp'"),
        (["up", "two_nodes", "--mode", "inpod", "-o", "colour=red"], "unknown option 'colour'"),
        (["up", "two_nodes", "--mode", "inpod", "--inpod-variant", "x"], "inpod_variant 'x'"),
        (["up", f"{BROKEN}:broken"], "build() raised ZeroDivisionError"),
        (["up", f"{BROKEN}:duplicate"], "duplicate pod name 'web'"),
        (["up", f"{BROKEN}:orphan"], "unknown node 'node9'"),
        (["up", "two_nodes", "--name", "Bad_Name"], "invalid run name"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_created(
    args: list[str], message: str, runs_root: Path
) -> None:
    name = fresh_name()
    named = args if "--name" in args else [*args, "--name", name]
    done = cli(runs_root, *named, "--detach")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(runs_root.iterdir()) == []
    assert netns_of_run(name) == []


def test_up_detach_exec_inspect_down(runs_root: Path) -> None:
    name = fresh_name()
    before = root_namespace_state()
    assert cli(runs_root, "up", "two_nodes", "--name", name, "--detach").returncode == 0
    try:
        ping = cli(runs_root, "exec", name, "client", "--", "ping", "-c", "1", "server2")
        assert ping.returncode == 0 and "10.244.2.2" in ping.stdout
        inv = json.loads(cli(runs_root, "inspect", name, "--json").stdout)
        assert {p["name"] for p in inv["pods"] if not p["system"]} == {
            "client",
            "server1",
            "server2",
        }
        assert {p["name"] for p in inv["pods"] if p["system"]} == {"coredns"}  # cluster DNS
        assert name in cli(runs_root, "ls").stdout
        assert cli(runs_root, "down", name).returncode == 0
    finally:
        cli(runs_root, "clean", "--all")
    assert netns_of_run(name) == []
    assert root_namespace_state() == before


def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigint_during_build_leaves_nothing(runs_root: Path) -> None:
    name = fresh_name()
    proc = subprocess.Popen(
        [
            *TESTBED,
            "--root",
            str(runs_root),
            "up",
            "multi_node,nodes=2,pods=200",
            "--name",
            name,
            "--detach",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: len(netns_of_run(name)) >= 20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert netns_of_run(name) == []
    assert list(runs_root.iterdir()) == []


SCRIPT = """
import sys, time
from pathlib import Path
from testbed.cluster import Cluster, load_topology
from testbed.redirect import create_mode
name, root = sys.argv[1], Path(sys.argv[2])
c = Cluster(load_topology("two_nodes"), create_mode("none"), name=name, root=root)
c.start()
p = c.pod("server2").spawn(["sleep", "600"], label="sleeper")
print(p.pid, flush=True)
time.sleep(600)
"""


def test_sigkill_then_clean_leaves_nothing(runs_root: Path) -> None:
    name = fresh_name()
    root = runs_root
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, name, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    sleeper = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    assert netns_of_run(name), "a crash leaves the testbed behind"
    assert Path(f"/proc/{sleeper}").exists()
    done = cli(root, "clean", name)
    assert done.returncode == 0, done.stderr
    assert netns_of_run(name) == []
    _wait_for(
        lambda: not Path(f"/proc/{sleeper}").exists()
        or Path(f"/proc/{sleeper}/stat").read_text().split()[2] == "Z",
        timeout=5,
    )
    assert not (root / name).exists()


def test_clean_all_spares_what_it_did_not_create(runs_root: Path) -> None:
    name = fresh_name()
    lookalike = f"tb-{name}x-node1"  # looks like ours, is not in any manifest
    nsutil.create_netns(lookalike)
    try:
        assert cli(runs_root, "up", "single_node", "--name", name, "--detach").returncode == 0
        done = cli(runs_root, "clean", "--all")
        assert done.returncode == 0, done.stderr
        assert netns_of_run(name) == []
        assert nsutil.netns_exists(lookalike)
    finally:
        nsutil.delete_netns(lookalike)


def test_interactive_shell_then_exit_tears_down(runs_root: Path) -> None:
    name = fresh_name()
    typed = "pods\nclient ping -c 1 server2\nexec server1 ip -o addr show eth0\npingall\nexit\n"
    done = cli(runs_root, "up", "two_nodes", "--name", name, input=typed)
    assert done.returncode == 0, done.stderr
    assert "1 received" in done.stdout  # `client ping server2`, the name resolved to its IP
    assert "10.244.1.3/32" in done.stdout  # server1's address, from inside server1
    assert "6/6 pairs reachable" in done.stdout
    assert netns_of_run(name) == []
    assert list(runs_root.iterdir()) == []
