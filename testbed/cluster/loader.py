"""Finding topologies by name, spec string (`multi_node,nodes=3,pods=10`) or file path.

Topology scripts are Python files that define a `topos` dict of name -> Topology class, the
convention of Mininet's `--custom` files. Built-ins live in the repository's `topologies/`;
more folders can be added with TESTBED_TOPOLOGY_PATH (colon separated).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from testbed.cluster.model import Topology, TopologyError

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "topologies"
_PARAM = re.compile(r"^([a-z_][a-z0-9_]*)=(.*)$")


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("TESTBED_TOPOLOGY_PATH", "").split(":") if p]
    return [*extra, BUILTIN_DIR]


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"testbed_topology_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise TopologyError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise TopologyError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
    return module


def _topos_of(path: Path) -> dict[str, type[Topology]]:
    topos = getattr(_import_file(path), "topos", None)
    if not isinstance(topos, dict) or not all(
        isinstance(c, type) and issubclass(c, Topology) for c in topos.values()
    ):
        raise TopologyError(f"{path}: expected a dict `topos` of name -> Topology subclass")
    return topos


def available() -> dict[str, Path]:
    """Name -> defining file, for every topology on the search path."""
    found: dict[str, Path] = {}
    for folder in search_path():
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
            if path.stem.startswith("_"):
                continue
            found.setdefault(path.stem, path)
    return found


def parse_value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'multi_node,nodes=3,pods=10' -> ('multi_node', {'nodes': 3, 'pods': 10})."""
    name, *parts = [p.strip() for p in spec.split(",")]
    if not name:
        raise TopologyError(f"topology spec {spec!r}: missing topology name before the first ','")
    params: dict[str, Any] = {}
    for part in parts:
        match = _PARAM.match(part)
        if not match:
            raise TopologyError(
                f"topology spec {spec!r}: {part!r} is not of the form key=value "
                "(lowercase key, e.g. nodes=3)"
            )
        params[match.group(1)] = parse_value(match.group(2))
    return name, params


def load_topology(spec: str, **overrides: Any) -> Topology:
    """Make a Topology from a spec string; `path/to/file.py[:name],k=v` also works."""
    name, params = parse_spec(spec)
    params.update(overrides)
    file_part, _, topo_name = name.partition(":")
    if file_part.endswith(".py"):
        path = Path(file_part)
        if not path.is_file():
            raise TopologyError(f"topology file {path} does not exist")
        topos = _topos_of(path)
        key = topo_name or (next(iter(topos)) if len(topos) == 1 else "")
        if key not in topos:
            raise TopologyError(f"{path}: choose one of {sorted(topos)} with {path}:NAME")
        cls = topos[key]
    else:
        files = available()
        if name not in files:
            raise TopologyError(
                f"unknown topology {name!r}; available: {', '.join(sorted(files)) or 'none'}"
            )
        topos = _topos_of(files[name])
        if name not in topos:
            raise TopologyError(f"{files[name]}: defines no topology named {name!r} in `topos`")
        cls = topos[name]
    try:
        topology = cls(**params)
    except TypeError as exc:
        raise TopologyError(f"topology {name}: bad parameters {params}: {exc}") from exc
    topology.name = name
    return topology
