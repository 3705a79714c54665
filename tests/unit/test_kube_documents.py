"""Istio YAML -> typed resources -> topology declarations, and the refusal of every field
the testbed does not support (one line per field, naming file, document and path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.cluster import Topology, load_topology, plan
from testbed.cluster.model import TopologyError
from testbed.kube import istio
from testbed.kube.documents import DocumentError, load_documents, parse_resources

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "istio"


def write(tmp_path: Path, *docs: object) -> Path:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(list(docs)))
    return path


def policy(spec: dict[str, object], **meta: object) -> dict[str, object]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "default", **meta}, "spec": spec}  # fmt: skip


def problems(path: Path) -> list[str]:
    with pytest.raises(DocumentError) as caught:
        load_documents(path)
    return caught.value.problems


@pytest.mark.parametrize("name", ["deny-server.yaml", "allow-client-only.yaml", "reviews-l7.yaml"])
def test_examples_parse(name: str) -> None:
    assert load_documents(EXAMPLES / name)


def test_every_unsupported_field_gives_one_line_naming_it(tmp_path: Path) -> None:
    bad_policy = policy(
        {"provider": {"name": "ext"},
         "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}],
                    "to": [{"operation": {"hosts": ["a"], "ports": ["80"]}}]}]},
        annotations={"a": "b"},
    )  # fmt: skip
    bad_route = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r"},
        "spec": {"parentRefs": [{"name": "reviews"}], "hostnames": ["x"],
                 "rules": [{"filters": [{"type": "RequestMirror"}]}]},
    }  # fmt: skip
    bad_gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "w"},
        "spec": {"gatewayClassName": "istio", "listeners": [{"name": "mesh", "port": 15008,
                                                             "protocol": "HBONE"}]},
    }  # fmt: skip
    path = write(tmp_path, bad_policy, bad_route, bad_gateway)
    lines = problems(path)
    expected = [
        "document 1 (AuthorizationPolicy p): metadata.annotations: not supported",
        "document 1 (AuthorizationPolicy p): spec.rules[0].from[0].source.requestPrincipals: "
        "not supported",
        "document 1 (AuthorizationPolicy p): spec.rules[0].to[0].operation.hosts: not supported",
        "document 1 (AuthorizationPolicy p): spec.provider: not supported",
        "document 2 (HTTPRoute r): spec.hostnames: not supported",
        "document 2 (HTTPRoute r): spec.rules[0].filters: not supported",
        "document 3 (Gateway w): spec.gatewayClassName: 'istio' is not supported",
    ]
    assert len(lines) == len(expected)
    for want in expected:
        assert sum(want in line for line in lines) == 1, (want, lines)
    assert all(line.startswith(f"{path}: document ") for line in lines)


def test_l4_policy_refuses_http_fields_and_unknown_kinds_and_labels(tmp_path: Path) -> None:
    l4_http = policy(
        {"rules": [{"to": [{"operation": {"paths": ["/x"]}}], "when": [{"key": "k"}]}]}
    )
    label = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "client", "labels": {"app": "x"}}}  # fmt: skip
    other = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {}}
    lines = problems(write(tmp_path, l4_http, label, other))
    assert len(lines) == 4
    assert "spec.rules[0].to[0].operation.paths: an HTTP field needs targetRefs" in lines[0]
    assert "spec.rules[0].when: not supported without targetRefs" in lines[1]
    assert "metadata.labels.app: not supported" in lines[2]
    assert "networking.istio.io/v1 VirtualService: not supported" in lines[3]


def test_bad_yaml_and_bad_port_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed")
    assert "not YAML" in problems(broken)[0]
    lines = problems(
        write(tmp_path, policy({"rules": [{"to": [{"operation": {"ports": ["x"]}}]}]}))
    )
    assert lines == [f"{tmp_path / 'in.yaml'}: document 1 (AuthorizationPolicy p): "
                     "spec.rules[0].to[0].operation.ports[0]: 'x' is not a port"]  # fmt: skip


class Bare(Topology):
    """reviews_waypoint without its route and L7 policy, with L4 policies of every field."""

    name = "bare"

    def build(self) -> None:
        self.add_node("node1")
        self.add_node("node2")
        self.label_namespace("default", {istio.USE_WAYPOINT: "waypoint"})
        self.add_waypoint("waypoint", "node2")
        self.add_pod("productpage", "node1", labels={"app": "productpage"})
        for version in ("v1", "v2"):
            labels = {"app": "reviews", "version": version}
            self.add_pod(f"reviews-{version}", "node1", service_account="reviews", labels=labels)
            self.add_service(f"reviews-{version}", selector=labels, ports={9080: 8080})
        self.add_service("reviews", selector={"app": "reviews"}, ports={9080: 8080})


def test_export_then_declare_gives_the_same_declarations() -> None:
    source = plan(load_topology("reviews_waypoint"))
    source.add_policy(
        "l4", action="DENY", selector={"app": "reviews"},
        rules=[{"principals": ["cluster.local/ns/default/sa/x"], "not_namespaces": ["a"],
                "ip_blocks": ["10.0.0.0/8"], "not_ip_blocks": ["10.1.0.0/16"],
                "ports": [8080], "not_ports": [9]}, {}],
    )  # fmt: skip
    source.add_policy("mesh-wide", namespace="istio-system", rules=[{"namespaces": ["default"]}])
    source.add_l7_policy(
        "l7-all-fields", services=["reviews", "reviews-v1"],
        rules=[{"from": [{"principals": ["cluster.local/ns/default/sa/productpage"],
                          "notNamespaces": ["other*"]}, {"namespaces": ["*"]}],
                "to": [{"methods": ["GET"], "notPaths": ["/private*"], "ports": [8080],
                        "notPorts": [9]}],
                "when": [{"key": "request.headers[x-user]", "values": ["*-admin"],
                          "notValues": ["root"]}]}],
    )  # fmt: skip
    source.add_l7_policy("whole-namespace", action="DENY", rules=[{"to": [{"paths": ["/x"]}]}])
    exported = istio.export_topology(source)
    target = plan(Bare())
    for resource in exported.all():
        istio.declare(target, resource)
    assert target.l7.routes == source.l7.routes
    assert target.l7.policies == source.l7.policies and len(source.l7.policies) == 3
    assert target.policies == source.policies
    whole = next(p for p in exported.policies if p.metadata.name == "whole-namespace")
    assert whole.dump()["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
    ]


def test_istio_rule_with_several_sources_becomes_their_union() -> None:
    target = plan(Bare())
    doc = policy({"selector": {"matchLabels": {"app": "reviews"}}, "rules": [{
        "from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}],
        "to": [{"operation": {"ports": ["1"]}}]}]})  # fmt: skip
    (resource,) = parse_resources([doc])
    istio.declare(target, resource)
    rules = target.policies["p"].rules
    assert [(r.namespaces, r.ports) for r in rules] == [(("a",), (1,)), (("b",), (1,))]


def test_withdraw_and_label_patches() -> None:
    target = plan(Bare())
    (patch,) = parse_resources([{"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "reviews", "labels": {istio.USE_WAYPOINT: "none"}}}])  # fmt: skip
    istio.declare(target, patch)
    assert target.services["reviews"].labels == {istio.USE_WAYPOINT: "none"}
    istio.withdraw(target, patch)
    assert target.services["reviews"].labels == {}
    (missing,) = parse_resources([policy({})])
    with pytest.raises(istio.ApplyError, match="not applied"):
        istio.withdraw(target, missing)


def test_apply_yaml_in_a_topology_and_its_errors(tmp_path: Path) -> None:
    class WithYaml(Bare):
        def build(self) -> None:
            super().build()
            self.apply_yaml(str(EXAMPLES / "reviews-l7.yaml"))

    topology = plan(WithYaml())
    assert [r.name for r in topology.l7.routes] == ["reviews"]
    assert [p.name for p in topology.l7.policies] == ["no-admin"]

    class Wrong(Bare):
        def build(self) -> None:
            super().build()
            self.apply_yaml(str(write(tmp_path, policy({"provider": {}}))))

    with pytest.raises(TopologyError, match=r"spec\.provider: not supported"):
        plan(Wrong())


def test_gateway_api_durations() -> None:
    assert istio.parse_duration("1m30s") == 90
    assert istio.parse_duration("500ms") == 0.5
    with pytest.raises(ValueError, match="duration"):
        istio.parse_duration("5")


def test_backend_ref_needs_a_port_as_on_a_cluster(tmp_path: Path) -> None:
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r"},
        "spec": {"parentRefs": [{"name": "reviews"}], "rules": [{"backendRefs": [{"name": "a"}]}]},
    }  # fmt: skip
    (line,) = problems(write(tmp_path, route))
    assert line.endswith(
        "document 1 (HTTPRoute r): spec.rules[0].backendRefs[0].port: Field required"
    )


def test_dataplane_mode_values_the_testbed_cannot_honour(tmp_path: Path) -> None:
    def patch(kind: str, value: str) -> dict[str, object]:
        return {"apiVersion": "v1", "kind": kind,
                "metadata": {"name": "x", "labels": {istio.DATAPLANE_MODE: value}}}  # fmt: skip

    lines = problems(write(tmp_path, patch("Namespace", "none"), patch("Service", "ambient"),
                           patch("Pod", "sidecar")))  # fmt: skip
    assert len(lines) == 3
    assert "'none' is not supported on a Namespace (expected ambient)" in lines[0]
    assert "on a Service (Istio reads it on Namespaces and Pods)" in lines[1]
    assert "'sidecar' is not supported on a Pod (expected ambient or none)" in lines[2]
    assert load_documents(write(tmp_path, patch("Namespace", "ambient"), patch("Pod", "none")))
