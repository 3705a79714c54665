from typing import Any

import pytest
import yaml

from testbed.mesh.authz import (
    CompiledPolicies,
    ConnectionFacts,
    Decision,
    PolicySet,
    evaluate,
)
from testbed.mesh.ca import Identity
from testbed.mesh.config import Authorization, LocalConfig

# The connections ztunnel's rbac.rs tests use.
PLAINTEXT = ConnectionFacts(None, "127.0.0.1", "127.0.0.2", 8080)
TLS = ConnectionFacts(Identity("td", "namespace", "account"), "127.0.0.1", "127.0.0.2", 8080)
TLS_ALT = ConnectionFacts(Identity("td-alt", "ns-alt", "sa-alt"), "127.0.0.3", "127.0.0.4", 9090)


def policy(rules: list[Any], action: str = "Allow", name: str = "p", **extra: Any) -> Authorization:
    return Authorization.model_validate(
        {"name": name, "namespace": "ns", "scope": "Global", "action": action, "rules": rules}
        | extra
    )


def matches(group: dict[str, Any], facts: ConnectionFacts) -> bool:
    return PolicySet([policy([[[group]]])]).evaluate(facts).allowed


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ({"namespaces": [{"Exact": "namespace"}]}, (False, True, False)),
        ({"notNamespaces": [{"Exact": "namespace"}]}, (True, False, True)),
        (
            {"serviceAccounts": [{"namespace": "namespace", "serviceAccount": "account"}]},
            (False, True, False),
        ),
        (
            {"notServiceAccounts": [{"namespace": "namespace", "serviceAccount": "account"}]},
            (True, False, True),
        ),
        ({"principals": [{"Exact": "td/ns/namespace/sa/account"}]}, (False, True, False)),
        ({"notPrincipals": [{"Exact": "td/ns/namespace/sa/account"}]}, (True, False, True)),
        ({"sourceIps": ["127.0.0.1/32"]}, (True, True, False)),
        ({"notSourceIps": ["127.0.0.1/32"]}, (False, False, True)),
        ({"destinationIps": ["127.0.0.2/32"]}, (True, True, False)),
        ({"notDestinationIps": ["127.0.0.2/32"]}, (False, False, True)),
        ({"destinationIps": ["127.0.0.1/24"]}, (True, True, True)),
        ({"destinationPorts": [8080]}, (True, True, False)),
        ({"notDestinationPorts": [8080]}, (False, False, True)),
    ],
)
def test_single_field_matches_like_ztunnel(
    group: dict[str, Any], expected: tuple[bool, bool, bool]
) -> None:
    assert tuple(matches(group, f) for f in (PLAINTEXT, TLS, TLS_ALT)) == expected


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        ("*", (False, True, True)),
        ("td/ns/namespace/sa/*", (False, True, False)),
        ("*/sa/sa-alt", (False, False, True)),
        ("td/ns/namespace/sa/account", (False, True, False)),
    ],
)
def test_istio_wildcard_principals(principal: str, expected: tuple[bool, bool, bool]) -> None:
    group = {"principals": [principal]}
    assert tuple(matches(group, f) for f in (PLAINTEXT, TLS, TLS_ALT)) == expected


def test_empty_shapes_like_ztunnel() -> None:
    assert not PolicySet([policy([[[{}]]])]).evaluate(PLAINTEXT).allowed  # empty group: no match
    assert PolicySet([policy([[[]]])]).evaluate(PLAINTEXT).allowed  # empty clause matches
    assert PolicySet([policy([[]])]).evaluate(PLAINTEXT).allowed  # rule with no clauses matches
    assert not PolicySet([policy([])]).evaluate(PLAINTEXT).allowed  # no rules: never matches


def test_nesting_groups_or_clauses_and_rules_or() -> None:
    ns_a_or_b = [{"namespaces": ["a"]}, {"namespaces": ["b"]}]
    port_80 = [{"destinationPorts": [80]}]
    nested = PolicySet([policy([[ns_a_or_b, port_80]])])

    def conn(ns: str, port: int) -> ConnectionFacts:
        return ConnectionFacts(Identity("td", ns, "sa"), "10.0.0.1", "10.0.0.2", port)

    assert nested.evaluate(conn("a", 80)).allowed
    assert nested.evaluate(conn("b", 80)).allowed
    assert not nested.evaluate(conn("c", 80)).allowed
    assert not nested.evaluate(conn("b", 81)).allowed
    two_rules = PolicySet([policy([[[{"namespaces": ["a"]}]], [[{"destinationPorts": [81]}]]])])
    assert two_rules.evaluate(conn("a", 1)).allowed
    assert two_rules.evaluate(conn("z", 81)).allowed
    assert not two_rules.evaluate(conn("z", 80)).allowed


def test_all_fields_of_a_group_must_match() -> None:
    group = {"namespaces": ["namespace"], "notDestinationPorts": [8080]}
    assert not matches(group, TLS)
    assert matches(group, ConnectionFacts(TLS.source_identity, "127.0.0.1", "127.0.0.2", 80))


def test_decision_order() -> None:
    deny_ns = policy([[[{"namespaces": ["ns-alt"]}]]], "Deny", "deny-alt")
    allow_port = policy([[[{"destinationPorts": [8080, 9090]}]]], "Allow", "allow-ports")
    allow_none = policy([[[{"destinationPorts": [1]}]]], "Allow", "allow-1")
    both = PolicySet([allow_port, deny_ns])
    assert both.evaluate(TLS_ALT) == Decision(False, "ns/deny-alt", "matched a DENY policy")
    assert both.evaluate(TLS) == Decision(True, "ns/allow-ports", "matched an ALLOW policy")
    assert PolicySet([deny_ns]).evaluate(TLS) == Decision(True, None, "no ALLOW policies apply")
    assert PolicySet([allow_none]).evaluate(TLS) == Decision(False, None, "no ALLOW policy matched")
    assert evaluate([], PLAINTEXT).allowed


def test_dry_run_policies_never_decide() -> None:
    deny_all = policy([[]], "Deny", "dry", dryRun=True)
    assert evaluate([deny_all], TLS) == Decision(True, None, "no ALLOW policies apply")


def test_compiled_policies_from_config() -> None:
    config = LocalConfig.model_validate(
        yaml.safe_load(
            """
            workloads:
            - {uid: a, namespace: prod, workloadIps: [10.0.0.1],
               authorizationPolicies: [prod/only-b]}
            - {uid: b, namespace: prod, workloadIps: [10.0.0.2]}
            - {uid: c, namespace: dev, workloadIps: [10.0.0.3]}
            policies:
            - {name: deny-dev, namespace: istio-system, scope: Global, action: Deny,
               rules: [[[{namespaces: [dev]}]]]}
            - {name: only-b, namespace: prod, scope: WorkloadSelector, action: Allow,
               rules: [[[{principals: ["cluster.local/ns/prod/sa/b"]}]]]}
            """
        )
    )
    compiled = CompiledPolicies.from_config(config)
    a, b = config.workload_by_uid("a"), config.workload_by_uid("b")
    assert a is not None and b is not None
    from_b = ConnectionFacts(Identity("cluster.local", "prod", "b"), "10.0.0.2", "10.0.0.1", 80)
    from_c = ConnectionFacts(Identity("cluster.local", "prod", "c"), "10.0.0.3", "10.0.0.1", 80)
    from_dev = ConnectionFacts(Identity("cluster.local", "dev", "x"), "10.0.0.3", "10.0.0.2", 80)
    assert compiled.evaluate(a, from_b).allowed
    assert compiled.evaluate(a, from_c) == Decision(False, None, "no ALLOW policy matched")
    assert compiled.evaluate(b, from_c).allowed  # only-b selects workload a alone
    assert compiled.evaluate(b, from_dev).policy == "istio-system/deny-dev"
