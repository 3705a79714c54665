"""Imports point down the layers (README, Development): read from the AST of every module
of testbed/, including imports inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.redirect import MODES

PACKAGE = Path(__file__).resolve().parents[2] / "testbed"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[str]:
    """Every module `path` imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module
            # `from testbed.redirect import inpod_rules` imports a module by its name
            yield from (f"{module}.{alias.name}" for alias in node.names)


@functools.cache
def imports() -> dict[str, set[str]]:
    """Module -> the testbed modules it imports."""
    return {
        module_name(path): {m for m in imported(path) if m.split(".")[0] == "testbed"}
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def in_layer(name: str) -> dict[str, set[str]]:
    return {m: targets for m, targets in imports().items() if layer(m) == name}


def crossings(name: str, allowed: set[str]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in in_layer(name).items()
        for target in targets
        if layer(target) not in allowed | {name}
    )


def test_the_walk_sees_every_layer_and_relative_imports() -> None:
    found = imports()
    assert {"netlab", "mesh", "cluster", "redirect", "experiment", "cli"} <= set(map(layer, found))
    assert "testbed.mesh.hbone.frames" in found["testbed.mesh.hbone.connection"]  # `from .`
    assert "testbed.cluster.cluster -> testbed.netlab" in crossings("cluster", set())


def test_netlab_imports_nothing_of_testbed() -> None:
    assert crossings("netlab", set()) == []


def test_mesh_imports_only_netlab() -> None:
    assert crossings("mesh", {"netlab"}) == []


@pytest.mark.parametrize("above", ["redirect", "measure", "experiment", "cli"])
def test_cluster_imports_nothing_above_it(above: str) -> None:
    assert [c for c in crossings("cluster", set()) if layer(c.split(" -> ")[1]) == above] == []


def test_nothing_imports_the_cli() -> None:
    assert [m for m, targets in imports().items() if "testbed.cli" in targets] == []


def test_a_mode_module_is_imported_by_the_registry_only() -> None:
    mode_modules = {cls.__module__ for cls in MODES.values()}
    users = {
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets & mode_modules
        if module != "testbed.redirect.registry"
    }
    assert users == set()


def test_rule_modules_share_only_the_rules_module() -> None:
    rule_modules = {m for m in imports() if m.endswith("_rules")}
    assert rule_modules >= {f"testbed.redirect.{mode}_rules" for mode in ("inpod", "legacy")}
    assert {(m, t) for m in rule_modules for t in imports()[m] if t in rule_modules} == set()


def test_importing_the_model_does_not_import_pyroute2() -> None:
    probe = "import sys, testbed.cluster.model; print('pyroute2' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
