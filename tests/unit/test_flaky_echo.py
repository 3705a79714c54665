"""The HTTP echo app as a flaky backend (`--fail-every N`), its own counters (`/stats`), the
peer it saw, and a named app declared with arguments of its own."""

from __future__ import annotations

import json

import pytest

from testbed.cluster.apps import app_argv
from testbed.cluster.model import AppSpec, Topology
from testbed.workloads.http_echo import FaultInjector, Request, parse_args


def _get(path: bytes) -> Request:
    return Request(b"GET", path, [], b"", "HTTP/1.1", "10.244.1.5:40000")


def test_every_third_request_is_answered_503_and_counted() -> None:
    faults = FaultInjector(every=3)
    statuses = [faults.answer(_get(b"/x"), "ratings").status for _ in range(7)]
    assert statuses == [200, 200, 503, 200, 200, 503, 200]
    assert faults.answer(_get(b"/healthz"), "ratings").status == 200  # not counted
    stats = faults.answer(_get(b"/stats"), "ratings")
    assert (stats.status, json.loads(stats.body)) == (200, {"requests": 7, "injected_503": 2})


def test_without_fail_every_nothing_is_injected_and_the_peer_is_described() -> None:
    faults = FaultInjector()
    reply = faults.answer(_get(b"/x?format=json"), "web")
    assert reply.status == 200
    assert json.loads(reply.body)["peer"] == "10.244.1.5:40000"
    assert (faults.requests, faults.injected) == (1, 0)


def test_fail_every_is_a_non_negative_integer() -> None:
    assert parse_args(["--fail-every", "3"]).fail_every == 3
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            parse_args(["--fail-every", bad])


def test_a_named_app_takes_arguments_of_its_own() -> None:
    topology = Topology()
    topology.add_node("n1")
    topology.add_pod("ratings", "n1", app="http-echo --fail-every 3")
    topology.add_pod("perf", "n1", app=["iperf3", "-1"], port=5300)
    ratings, perf = topology.pods["ratings"].app, topology.pods["perf"].app
    assert ratings == AppSpec("http-echo", 8080, ("--fail-every", "3"))
    assert ratings.describe() == "http-echo --fail-every 3 :8080"
    assert app_argv("ratings", ratings)[-4:] == ["--port", "8080", "--fail-every", "3"]
    assert perf is not None and app_argv("perf", perf) == ["iperf3", "-s", "-p", "5300", "-1"]
