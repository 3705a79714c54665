"""`testbed doctor` probes the kernel in scratch namespaces and names what depends on what."""

import json
import subprocess
import sys

from hoststate import root_namespace_state


def test_doctor_reports_features_and_leaves_the_host_alone() -> None:
    before = root_namespace_state()
    done = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    features = {f["name"]: f for f in json.loads(done.stdout)}
    for essential in ("netns", "veth", "bridge", "iptables REDIRECT", "tool ip"):
        assert features[essential]["ok"] and features[essential]["essential"]
    for probed in (
        "geneve",
        "vxlan",
        "netem",
        "htb",
        "tbf",
        "nftables",
        "iptables TPROXY",
        "iptables socket match",
        "clsact",
        "bpf_sk_assign",
        "ktls",
    ):
        assert isinstance(features[probed]["ok"], bool)
        assert features[probed]["needed_by"]
    assert "legacy" in features["geneve"]["needed_by"]
    assert root_namespace_state() == before


def test_doctor_table_names_the_vxlan_fallback_when_geneve_is_missing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    features = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    geneve = next(f for f in json.loads(features.stdout) if f["name"] == "geneve")
    assert ("tunnel=vxlan" in done.stdout) == (not geneve["ok"])
