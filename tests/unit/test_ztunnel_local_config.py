"""The generated mesh config is a file Istio's ztunnel can load (LOCAL_XDS_PATH).

Istio's ztunnel parses it with serde_yaml 0.9, which reads string matches only as YAML tags
(`!Exact v`, `!Prefix v`, `!Suffix v`, `!Presence`). The loader below is written here, apart
from testbed.mesh.config, to read the file as serde_yaml does: tags become `Tagged` values and a
string match in any other form (a map, a plain string) is an error, as it is for serde_yaml.

The golden file pins the exact text for one topology; after an intended change regenerate it:
    PYTHONPATH=tests python -c "from unit.test_ztunnel_local_config import golden_text as g; \
print(g(), end='')" > tests/unit/fixtures/two_nodes_mesh_config.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from ztunnel_configs import with_policies

from testbed.cluster import Topology
from testbed.cluster.loader import available
from testbed.mesh.config import LocalConfig
from testbed.redirect.control import mesh_config

GOLDEN = Path(__file__).parent / "fixtures" / "two_nodes_mesh_config.yaml"
STRING_MATCH_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces")


class Tagged(NamedTuple):
    variant: str
    value: str | None


class SerdeLikeLoader(yaml.SafeLoader):
    """Reads serde_yaml's externally tagged enums: `!Variant value`, `!Variant []`."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    variant = node.tag[1:]
    if variant == "Presence":  # a unit-like tuple variant: `[]` or nothing at all
        assert node.value in ("", []), f"!Presence with a value at {node.start_mark}"
        return Tagged(variant, None)
    assert isinstance(node, yaml.ScalarNode), f"!{variant} needs a string at {node.start_mark}"
    return Tagged(variant, loader.construct_scalar(node))


for _variant in ("Exact", "Prefix", "Suffix", "Presence"):
    SerdeLikeLoader.add_constructor(f"!{_variant}", _tagged)


def serde_load(text: str) -> Any:
    return yaml.load(text, Loader=SerdeLikeLoader)


def expected_match(pattern: str) -> Tagged:
    """Istio's wildcard forms as ztunnel's StringMatch variants."""
    if pattern == "*":
        return Tagged("Presence", None)
    if pattern.startswith("*"):  # first, as istiod does: "*/sa/*" is a suffix
        return Tagged("Suffix", pattern[1:])
    if pattern.endswith("*"):
        return Tagged("Prefix", pattern[:-1])
    return Tagged("Exact", pattern)


def golden_text() -> str:
    return mesh_config(with_policies("two_nodes")).dump_yaml()


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def check_string_matches(data: dict[str, Any], topology: Topology) -> int:
    """Every string match is a tag and says what the topology's rule says; returns the count."""
    checked = 0
    for policy in data["policies"]:
        spec = topology.policies[policy["name"]]
        rules = [rule for rule in spec.rules if rule != type(rule)()]  # empty rules: no clauses
        for rule, clauses in zip(spec.rules, policy["rules"], strict=True):
            if rule not in rules:
                assert clauses == []
                continue
            (match,) = [group for clause in clauses for group in clause]
            for field in STRING_MATCH_FIELDS:
                written = match.get(field, [])
                assert all(isinstance(m, Tagged) for m in written), (policy["name"], field)
                assert written == [expected_match(p) for p in getattr(rule, _snake(field))]
                checked += len(written)
    return checked


def test_every_builtin_topology_is_covered() -> None:
    assert {"single_node", "two_nodes", "multi_node", "reviews_waypoint"} <= set(available())


@pytest.mark.parametrize("name", sorted(available()))
def test_generated_config_round_trips_through_a_serde_yaml_reader(
    name: str, tmp_path: Path
) -> None:
    topology = with_policies(name)
    config = mesh_config(topology)
    text = config.dump_yaml()
    data = serde_load(text)
    assert check_string_matches(data, topology) == 11
    assert [p["scope"] for p in data["policies"]] == ["Namespace", "WorkloadSelector", "Global"]
    assert {w["uid"] for w in data["workloads"]} == {p.uid for p in topology.pods.values()}
    # serde requires these although they are defaults (ztunnel has no default for them).
    assert all("dryRun" in p and "rules" in p for p in data["policies"])
    assert all("services" in w for w in data["workloads"])
    assert all("vips" in s and "ports" in s for s in data["services"])
    # And our own reader takes the file back unchanged.
    path = tmp_path / "mesh-config.yaml"
    path.write_text(text)
    again = LocalConfig.load(path)
    assert again == config
    assert again.dump_yaml() == text


def test_golden_text_for_two_nodes() -> None:
    assert golden_text() == GOLDEN.read_text()
