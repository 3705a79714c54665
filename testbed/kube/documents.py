"""Reading Istio YAML files (`kubectl apply -f` style, several documents per file) into the
typed resources of testbed.kube.resources.

Every field the testbed does not support is refused, one line per field naming the file,
the document (1-based) and the field's path, e.g.

    policy.yaml: document 2 (AuthorizationPolicy deny-admin): spec.rules[0].to[0].operation.hosts:
        not supported by the testbed
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from testbed.kube import resources as r
from testbed.kube.istio import DATAPLANE_MODE, LABEL_KEYS
from testbed.netlab.errors import TestbedError

HTTP_OPERATION_FIELDS = ("methods", "not_methods", "paths", "not_paths")


class DocumentError(TestbedError, ValueError):
    """Unsupported or malformed resources; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_documents(path: Path) -> list[r.IstioResource]:
    """Every resource of a YAML file, or DocumentError listing every problem found."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except OSError as exc:
        raise DocumentError([f"{path}: cannot be read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise DocumentError([f"{path}: not YAML: {exc}"]) from None
    problems: list[str] = []
    parsed: list[r.IstioResource] = []
    for index, doc in enumerate(docs, start=1):
        resource, errors = parse_document(doc)
        where = f"{path}: document {index}{_what(doc)}"
        problems += [f"{where}: {error}" for error in errors]
        if resource is not None and not errors:
            parsed.append(resource)
    if not docs:
        problems.append(f"{path}: no documents")
    if problems:
        raise DocumentError(problems)
    return parsed


def _what(doc: Any) -> str:
    if not isinstance(doc, dict):
        return ""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return f" ({doc.get('kind', '?')} {name})" if name else f" ({doc.get('kind', '?')})"


def parse_document(doc: Any) -> tuple[r.IstioResource | None, list[str]]:
    """One resource, or the list of what is wrong with it (field path: problem)."""
    if not isinstance(doc, dict):
        return None, [f"expected a mapping with apiVersion and kind, got {type(doc).__name__}"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    model = r.KINDS.get(key)  # type: ignore[arg-type]
    if model is None:
        known = ", ".join(f"{v} {k}" for v, k in r.KINDS)
        return None, [f"apiVersion/kind {key[0]} {key[1]}: not supported (supported: {known})"]
    try:
        resource: r.IstioResource = model.model_validate(doc)
    except ValidationError as exc:
        return None, [_problem(error) for error in exc.errors()]
    return resource, semantic_problems(resource)


def _problem(error: Any) -> str:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if error["type"] == "extra_forbidden":
        return f"{path}: not supported by the testbed"
    if error["type"] == "literal_error":
        return f"{path}: {error['input']!r} is not supported ({error['msg']})"
    return f"{path}: {error['msg']}"


# Values of istio.io/dataplane-mode the testbed can honour, by kind: its namespaces are all
# in the mesh (as if labelled ambient), a pod leaves it with `none`; Istio reads the label
# from namespaces and pods only.
DATAPLANE_VALUES = {"Namespace": ("ambient",), "Pod": ("ambient", "none"), "Service": ()}


def label_problems(patch: r.LabelPatch) -> list[str]:
    problems = [
        f"metadata.labels.{key}: not supported (only {', '.join(LABEL_KEYS)} are applied)"
        for key in patch.metadata.labels
        if key not in LABEL_KEYS
    ]
    value = patch.metadata.labels.get(DATAPLANE_MODE)
    allowed = DATAPLANE_VALUES[patch.kind]
    if value is not None and value not in allowed:
        hint = (
            f"expected {' or '.join(allowed)}"
            if allowed
            else "Istio reads it on Namespaces and Pods"
        )
        problems.append(
            f"metadata.labels.{DATAPLANE_MODE}: {value!r} is not supported on a {patch.kind} "
            f"({hint})"
        )
    return problems


def semantic_problems(resource: r.IstioResource) -> list[str]:
    """What the schema allows but the testbed's model of it cannot express."""
    if isinstance(resource, r.LabelPatch):
        return label_problems(resource)
    if not isinstance(resource, r.AuthorizationPolicy):
        return []
    spec = resource.spec
    problems = []
    if spec.selector and spec.target_refs:
        problems.append("spec: selector and targetRefs together are not supported")
    for i, rule in enumerate(spec.rules or []):
        at = f"spec.rules[{i}]"
        for j, target in enumerate(rule.to or []):
            for name in ("ports", "not_ports"):
                for k, port in enumerate(getattr(target.operation, name) or []):
                    if not port.isdigit() or not 0 < int(port) < 65536:
                        alias = r.Operation.model_fields[name].alias
                        problems.append(
                            f"{at}.to[{j}].operation.{alias}[{k}]: {port!r} is not a port"
                        )
        if spec.target_refs:  # enforced by the waypoint: no IP blocks there
            for j, source in enumerate(rule.from_ or []):
                for name in ("ip_blocks", "not_ip_blocks"):
                    if getattr(source.source, name) is not None:
                        alias = r.Source.model_fields[name].alias
                        problems.append(
                            f"{at}.from[{j}].source.{alias}: not supported in a policy with "
                            "targetRefs (the waypoint matches identities, not addresses)"
                        )
            continue
        for j, target in enumerate(rule.to or []):
            for name in HTTP_OPERATION_FIELDS:
                if getattr(target.operation, name) is not None:
                    alias = r.Operation.model_fields[name].alias
                    problems.append(
                        f"{at}.to[{j}].operation.{alias}: an HTTP field needs targetRefs "
                        "(a waypoint enforces L7 rules; ztunnel only L4)"
                    )
        if rule.when:
            problems.append(f"{at}.when: not supported without targetRefs (L4 policy)")
    return problems


def parse_resources(docs: list[Any]) -> list[r.IstioResource]:
    """Documents already loaded (e.g. from a state file) as resources, or DocumentError."""
    problems, parsed = [], []
    for index, doc in enumerate(docs, start=1):
        resource, errors = parse_document(doc)
        problems += [f"document {index}{_what(doc)}: {error}" for error in errors]
        if resource is not None and not errors:
            parsed.append(resource)
    if problems:
        raise DocumentError(problems)
    return parsed
