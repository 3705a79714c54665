"""Apps declared on pods (issue 15 item 5): the model's validation, the commands, the state
read back from an inventory record, and the shell's URL resolution."""

import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from testbed.cluster import Topology, TopologyError, plan
from testbed.cluster.apps import app_argv, app_state
from testbed.cluster.loader import load_topology
from testbed.cluster.model import AppSpec
from testbed.netlab.process import process_start_time
from testbed.shell import ClusterShell


def one_pod(**kwargs: Any) -> Topology:
    topo = Topology()
    topo.add_node("node1")
    topo.add_pod("web", "node1", **kwargs)
    return topo


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, None),
        ({"app": "http-echo"}, AppSpec("http-echo", 8080)),
        ({"app": "http-echo", "port": 80}, AppSpec("http-echo", 80)),
        ({"app": "iperf3"}, AppSpec("iperf3", 5201)),
        ({"app": "sockperf", "port": 12000}, AppSpec("sockperf", 12000)),
        ({"app": ["sleep", "60"]}, AppSpec("command", None, ("sleep", "60"))),
        ({"app": "nc -lk 7000", "port": 7000}, AppSpec("command", 7000, ("nc", "-lk", "7000"))),
        ({"app": "sh -c 'exit 3'"}, AppSpec("command", None, ("sh", "-c", "exit 3"))),
    ],
)  # fmt: skip
def test_declared_apps(kwargs: dict[str, Any], expected: AppSpec | None) -> None:
    assert one_pod(**kwargs).pods["web"].app == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"app": "nginx"}, "pod 'web': app 'nginx' is not one of ['http-echo', 'iperf3', "),
        ({"app": "http-echo", "port": 0}, "pod 'web': port 0 is not in 1-65535"),
        ({"app": "iperf3", "port": 70000}, "pod 'web': port 70000 is not in 1-65535"),
        ({"app": "iperf3", "port": "80"}, "pod 'web': port '80' is not an integer in 1-65535"),
        ({"app": "iperf3", "port": True}, "pod 'web': port True is not an integer"),
        ({"port": 8080}, "pod 'web': port=8080 without an app (set app= too)"),
        ({"app": []}, "pod 'web': app []: a command needs non-empty string words"),
        ({"app": ["sleep", 5]}, "a command needs non-empty string words"),
        ({"app": "sh -c 'unclosed"}, "pod 'web': app \"sh -c 'unclosed\" is not a command line"),
    ],
)  # fmt: skip
def test_bad_apps_are_refused_naming_pod_and_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError) as caught:
        one_pod(**kwargs)
    assert str(caught.value).startswith("topology custom: ")
    assert message in str(caught.value)


def test_example_topologies_declare_their_apps() -> None:
    reviews = plan(load_topology("reviews_waypoint"))
    assert {n: p.app for n, p in reviews.pods.items() if p.app} == {
        "reviews-v1": AppSpec("http-echo", 8080),
        "reviews-v2": AppSpec("http-echo", 8080),
        "ratings": AppSpec("http-echo", 8080, ("--fail-every", "3")),
    }
    bare = plan(load_topology("reviews_waypoint,apps=false"))
    assert not [p for p in bare.pods.values() if p.app]
    two = plan(load_topology("two_nodes"))
    assert {n: p.app for n, p in two.pods.items() if p.app} == {
        "server1": AppSpec("http-echo", 80),
        "server2": AppSpec("http-echo", 80),
    }
    assert not [p for p in plan(load_topology("two_nodes,apps=false")).pods.values() if p.app]
    with pytest.raises(TopologyError, match="apps='no': expected true or false"):
        load_topology("two_nodes,apps=no")


def test_app_commands() -> None:
    echo = app_argv("web", AppSpec("http-echo", 80))
    assert echo[1:] == ["-m", "testbed.workloads.http_echo", "--name", "web", "--port", "80"]
    assert app_argv("p", AppSpec("iperf3", 5201)) == ["iperf3", "-s", "-p", "5201"]
    assert app_argv("p", AppSpec("sockperf", 11111))[:3] == ["sockperf", "server", "--tcp"]
    assert app_argv("p", AppSpec("command", None, ("sleep", "9"))) == ["sleep", "9"]


def record(tmp_path: Path, pid: int, start_time: int) -> dict[str, Any]:
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)))
    return {
        "pod": "web",
        "app": "command",
        "command": "sleep 9",
        "port": None,
        "pid": pid,
        "start_time": start_time,
        "log": str(log),
        "exit_file": str(tmp_path / "app.exit"),
    }


def test_app_state_running_exited_gone(tmp_path: Path) -> None:
    me = os.getpid()
    running = record(tmp_path, me, process_start_time(me) or 0)
    assert app_state(running)["state"] == "running"
    assert "output" not in app_state(running)
    gone = record(tmp_path, me, 1)  # not this process: its start time differs
    assert app_state(gone)["state"] == "gone"
    (tmp_path / "app.exit").write_text("3\n")
    exited = app_state(running)
    assert (exited["state"], exited["exit_code"]) == ("exited", 3)
    assert exited["output"].splitlines() == [f"line {i}" for i in range(10, 20)]


class FakeCluster:
    run = "fake"
    names = {"web": "10.244.1.2", "front": "10.96.0.10"}

    def resolve_host(self, text: str) -> str:
        return self.names.get(text, text)


@pytest.mark.parametrize(
    ("word", "resolved"),
    [
        ("http://web:8080/hello?x=1", "http://10.244.1.2:8080/hello?x=1"),
        ("http://front/", "http://10.96.0.10/"),
        ("web:8080/x", "10.244.1.2:8080/x"),
        ("front", "10.96.0.10"),
        ("http://example.org/web", "http://example.org/web"),
        ("-v", "-v"),
        ("--max-time", "--max-time"),
    ],
)
def test_shell_curl_resolves_names_in_urls(word: str, resolved: str) -> None:
    shell = ClusterShell(FakeCluster(), Console())  # type: ignore[arg-type]
    assert shell._resolve_url(word) == resolved
