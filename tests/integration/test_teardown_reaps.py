"""Issue 16 item 0: teardown ends every process inside the testbed's namespaces.

Daemons are started in pods and nodes the ways a user would (`iperf3 -D`, `cmd &`,
`setsid nohup cmd &`, one that ignores SIGTERM); after `Cluster.stop()`, or `testbed clean`
after the CLI crashed, no process anywhere on the machine may be left in any namespace the
run created. The test holds each namespace open, so its identity stays unique while it
looks; a process outside the testbed, started alongside, must be left alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed.cluster import Cluster, load_topology
from testbed.netlab import RunManifest
from testbed.netlab.nsutil import netns_path
from testbed.netlab.reap import NetnsId, opened_netns, pids_in
from testbed.redirect import create_mode

TESTBED = [sys.executable, "-m", "testbed.cli"]
DAEMONS = [  # (pod or node, shell command): the ways a user leaves something running
    ("server2", "iperf3 -s -D -p 5299"),
    ("client", "sleep 1001 >/dev/null 2>&1 &"),
    ("server1", "setsid nohup sleep 1002 >/dev/null 2>&1 &"),
    ("node1", "iperf3 -s -D -p 5298"),
    ("node2", "setsid nohup sh -c 'trap \"\" TERM; sleep 1003' >/dev/null 2>&1 &"),
]


def fresh_name() -> str:
    return "r" + uuid.uuid4().hex[:7]


@contextmanager
def namespaces_of(manifest: RunManifest) -> Iterator[dict[NetnsId, str]]:
    paths = [netns_path(e["name"]) for e in manifest.entries() if e.kind == "netns"]
    with opened_netns(paths) as owned:
        assert len(owned) == len(paths) > 0
        yield owned


def wait_for_daemons(owned: dict[NetnsId, str], count: int) -> dict[int, NetnsId]:
    deadline = time.monotonic() + 20
    while len(found := pids_in(owned)) < count:
        assert time.monotonic() < deadline, f"only {found} of {count} daemons started"
        time.sleep(0.05)
    return found


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process outside the testbed's namespaces, which teardown must not touch."""
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    proc.kill()
    proc.wait()


def test_cluster_stop_ends_daemons_in_pods_and_nodes(
    runs_root: Path, bystander: subprocess.Popen[bytes]
) -> None:
    cluster = Cluster(
        load_topology("two_nodes"), create_mode("none"), name=fresh_name(), root=runs_root
    ).start()
    assert cluster.lab is not None
    try:
        with namespaces_of(cluster.lab.manifest) as owned:
            for where, command in DAEMONS:
                host = cluster.nodes[where].netns if where in cluster.nodes else cluster.pod(where)
                host.run(["sh", "-c", command])
            daemons = wait_for_daemons(owned, len(DAEMONS))
            started = time.monotonic()
            cluster.stop()
            assert pids_in(owned) == {}, "a process outlived teardown in a testbed namespace"
            assert time.monotonic() - started < 30
            assert all(not Path(f"/proc/{pid}/ns/net").exists() for pid in daemons)
    finally:
        cluster.stop()
    assert bystander.poll() is None, "teardown signalled a process outside the testbed"


CRASHING = """
import sys, time
from pathlib import Path
from testbed.cluster import Cluster, load_topology
from testbed.redirect import create_mode
topology = load_topology("two_nodes")
Cluster(topology, create_mode("none"), name=sys.argv[1], root=Path(sys.argv[2])).start()
print("up", flush=True)
time.sleep(600)
"""


def test_clean_after_a_crash_ends_daemons(
    runs_root: Path, bystander: subprocess.Popen[bytes]
) -> None:
    name = fresh_name()
    builder = subprocess.Popen(
        [sys.executable, "-c", CRASHING, name, str(runs_root)], stdout=subprocess.PIPE, text=True
    )
    assert builder.stdout is not None
    assert builder.stdout.readline().strip() == "up"
    builder.kill()  # the CLI dies without tearing anything down
    builder.wait()
    manifest = RunManifest.open(name, runs_root)
    with namespaces_of(manifest) as owned:
        for where, command in DAEMONS:
            if where.startswith("node"):  # nodes are not pods: reached as any netns is
                argv = ["ip", "netns", "exec", f"tb-{name}-{where}", "sh", "-c", command]
            else:
                argv = [*TESTBED, "--root", str(runs_root), "exec", name, where, "--"]
                argv += ["sh", "-c", command]
            subprocess.run(argv, check=True, timeout=30, capture_output=True)
        wait_for_daemons(owned, len(DAEMONS))
        done = subprocess.run(
            [*TESTBED, "--root", str(runs_root), "clean", name],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert pids_in(owned) == {}, "a process outlived `testbed clean` in its namespace"
    assert not (runs_root / name).exists()
    assert bystander.poll() is None, "clean signalled a process outside the testbed"
