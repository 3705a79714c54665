"""Issue 16 item 2: faults under load, in inpod on two nodes (testbed.chaos).

One cluster for the module (the chaos topology: client1/server1 on node1, client2/server2
and the waypoint on node2). Its flows run through every test: sha256-checked bulk
transfers on both node pairs and across, fixed-rate HTTP to server2 and through the
waypoint. Each test injects one fault under that load and asserts the verdict:

- flows off the fault's path keep flowing, every byte intact (sha256);
- flows on it fail cleanly: reset or EOF, the operation in flight ended within
  FAIL_SECONDS (5 s) of the fault, never a hang (no progress for HANG_SECONDS, 10 s);
- new connections on them work within RECOVERY_SECONDS (5 s) of the repair returning
  (a restarted proxy answering /healthz/ready).

The last two tests need the faults before them (pytest runs a module in order): the
proxies' descriptors are back to baseline, and after teardown no process is left in any
namespace of the run and its manifest is gone. `make chaos` is the long version.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.chaos.rig import FD_TOLERANCE, Rig
from testbed.chaos.verdict import FAIL_SECONDS, RECOVERY_SECONDS
from testbed.netlab import clean_all
from testbed.redirect.inpod import InPodMode

TEST_RUNS = Path("/run/testbed-tests")
KILLS = {  # fault -> the proxy it kills
    "kill-ztunnel-node1": "ztunnel-node1",
    "kill-ztunnel-node2": "ztunnel-node2",
    "kill-waypoint": "waypoint-waypoint",
}


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    root = TEST_RUNS / uuid.uuid4().hex[:12]  # a manifest root of the module's own
    root.mkdir(parents=True)
    built = Rig.build("inpod", name="chaos" + uuid.uuid4().hex[:6], root=root)
    try:
        built.warm_up()
        built.start_flows()
        yield built
    finally:
        built.close()
        clean_all(root)
        shutil.rmtree(root, ignore_errors=True)


def mode_of(rig: Rig) -> InPodMode:
    assert isinstance(rig.mode, InPodMode)
    return rig.mode


def enrolled_pods(rig: Rig, node: str) -> set[str]:
    return set(mode_of(rig).config_dump(node)["pods"])


@pytest.mark.parametrize("name", sorted(KILLS))
def test_a_killed_proxy_fails_only_its_paths_cleanly_and_comes_back(rig: Rig, name: str) -> None:
    fault = rig.faults()[name]
    label = KILLS[name]
    old_pid = rig.mode.proxy_pids()[label]
    pods = {node: enrolled_pods(rig, node) for node in ("node1", "node2")}
    verdict = rig.apply(fault)
    assert verdict.ok, verdict.problems
    assert rig.mode.proxy_pids()[label] != old_pid
    assert sum(verdict.failed_ops.values()) > 0, "the kill broke nothing: not a real fault"
    assert all(0 <= s <= FAIL_SECONDS for s in verdict.in_flight_end.values())
    assert set(verdict.recovery) == fault.affected
    assert all(s is not None and s <= RECOVERY_SECONDS for s in verdict.recovery.values())
    # a restarted ztunnel got the CNI agent's snapshot: it serves the same pods again
    assert {node: enrolled_pods(rig, node) for node in pods} == pods


def test_a_killed_cni_agent_disturbs_nothing_and_its_successor_resends_the_pods(
    rig: Rig,
) -> None:
    mode = mode_of(rig)
    ztunnel_pid = mode.proxy_pids()["ztunnel-node1"]
    agent_pid = mode.agent_processes["node1"].pid
    pods = enrolled_pods(rig, "node1")
    assert pods == {"default-client1", "default-server1"}
    verdict = rig.apply(rig.faults()["kill-cni-agent-node1"])
    assert verdict.ok, verdict.problems  # every flow is off its path: none failed
    assert mode.agent_processes["node1"].pid != agent_pid
    assert mode.proxy_pids()["ztunnel-node1"] == ztunnel_pid  # ztunnel kept running
    assert enrolled_pods(rig, "node1") == pods
    server1 = rig.cluster.pod("server1")  # the new agent takes requests and reaches ztunnel
    mode.unenroll(server1)
    assert enrolled_pods(rig, "node1") == pods - {"default-server1"}
    mode.enroll(server1)
    assert enrolled_pods(rig, "node1") == pods


def test_a_pod_leaves_and_rejoins_the_mesh_under_load(rig: Rig) -> None:
    verdict = rig.apply(rig.faults()["unenroll-server1"])
    assert verdict.ok, verdict.problems
    assert "default-server1" in enrolled_pods(rig, "node1")
    assert verdict.recovery["bulk-node1"] is not None


def test_a_deny_policy_cuts_only_its_flow_and_its_removal_restores_it(rig: Rig) -> None:
    verdict = rig.apply(rig.faults()["deny-client1-to-server2"])
    assert verdict.ok, verdict.problems
    assert verdict.failed_ops["bulk-cross"] > 0, "the DENY did not stop client1 -> server2"
    assert verdict.recovery["bulk-cross"] is not None


def test_a_node_link_down_and_up_keeps_other_paths_and_corrupts_nothing(rig: Rig) -> None:
    verdict = rig.apply(rig.faults()["link-down-node1"])
    assert verdict.ok, verdict.problems
    assert all(s is not None for s in verdict.recovery.values())


def test_no_transfer_was_corrupted_or_hung_and_descriptors_are_back_to_baseline(
    rig: Rig,
) -> None:
    rig.stop_flows()
    ops = [op for flow_ops in rig.ops().values() for op in flow_ops]
    assert len(ops) > 100
    assert [op for op in ops if op.outcome in ("corrupt", "hang")] == []
    assert sum(op.outcome == "ok" for op in ops) > 0.8 * len(ops)
    assert set(rig.baseline_fds) >= {"ztunnel-node1", "ztunnel-node2", "cni-agent-node1"}
    assert rig.fd_leaks() == [], f"tolerance {FD_TOLERANCE} descriptors"


def test_teardown_leaves_no_process_namespace_or_manifest(rig: Rig) -> None:
    assert rig.teardown() == []
