"""Fuzz the user-facing loaders: the mesh config (testbed/mesh/config.py), the topology
spec (testbed/cluster/loader.py) and the experiment spec (testbed/experiment/spec.py).

Inputs are valid documents with one part replaced by anything YAML can say, and raw bytes
(not UTF-8, deep nesting, alias bombs). Property: a document loads, or fails with the
loader's own error (ConfigError, TopologyError, SpecError): one clear message that names
the file or spec, never another exception, a traceback, or unbounded time and memory.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from fuzz_support import note_outcome, replay, rss_bytes, tried
from hypothesis import given
from hypothesis import strategies as st

from testbed.cluster.loader import load_topology
from testbed.cluster.model import TopologyError, plan
from testbed.experiment.spec import SpecError, load_spec
from testbed.mesh.config import ConfigError, LocalConfig

RSS_GROWTH_LIMIT = 256 << 20
# tmpfs when there is one: a file per input on disk cost more than the loading
_WORKDIR = Path(
    tempfile.mkdtemp(prefix="loader-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
)

MESH = {
    "workloads": [
        {
            "uid": "c1//v1/Pod/default/a",
            "name": "a",
            "namespace": "default",
            "serviceAccount": "a",
            "workloadIps": ["10.0.1.2"],
            "protocol": "HBONE",
            "waypoint": {"destination": "/10.0.3.2", "hboneMtlsPort": 15008},
            "authorizationPolicies": ["default/p"],
            "services": {"default/s.default.svc.cluster.local": {8000: 80}},
        }
    ],
    "services": [
        {
            "name": "s",
            "namespace": "default",
            "hostname": "s.default.svc.cluster.local",
            "vips": ["/10.96.0.10"],
            "ports": {8000: 80},
            "endpoints": {
                "c1//v1/Pod/default/a": {"workloadUid": "c1//v1/Pod/default/a", "port": {8000: 80}}
            },
        }
    ],
    "policies": [
        {
            "name": "p",
            "namespace": "default",
            "scope": "WorkloadSelector",
            "action": "Allow",
            "rules": [[[{"namespaces": [{"Exact": "default"}], "destinationPorts": [80]}]]],
        }
    ],
}
SPEC = {
    "name": "fuzz",
    "topology": "two_nodes",
    "modes": ["none"],
    "workloads": ["tcp_stream", "tcp_rr"],
    "sweeps": {"parallel": [1], "msg_sizes": [64], "connections": [1], "qps": [100]},
    "placements": ["same-node", "cross-node"],
    "pinning": "none",
    "repetitions": 1,
    "duration": 1,
}

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["", "/10.0.0.1", "10.0.0.300", "default/x", "::1", "all", "Exact"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_scalars, inner, max_size=3),
    max_leaves=6,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, (*prefix, index))
    return found


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    changed = copy.deepcopy(doc)
    target = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return changed


def mutated(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    paths = _paths(base)
    return st.builds(
        lambda path, value: yaml.safe_dump(_replaced(base, path, value)).encode(),
        st.sampled_from(paths),
        _values,
    )


_hostile = st.one_of(
    st.binary(max_size=200),
    st.just(b"\xff\xfe not utf-8"),
    st.just(b"[" * 5000),  # nesting past the recursion limit
    st.just(
        b"a: &a [1,1,1,1,1,1,1,1,1]\n"
        + b"".join(
            b"%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n" % ((98 + i, 98 + i) + (97 + i,) * 9)
            for i in range(8)
        )
        + b"workloads: *i\n"
    ),  # an alias bomb: 9^9 references once expanded
)


def _outcome(target: str, data: bytes, load: Callable[[], object], error: type[Exception]) -> None:
    if not tried(target):
        return
    try:
        load()
        outcome = "ok"
    except error as exc:
        message = str(exc)
        assert message, "an error without a message"
        assert "\n" not in message.strip() or error is SpecError, message  # spec: one per field
        assert "Traceback" not in message
        outcome = message.split(":", 2)[1].strip()[:30] if ":" in message else "error"
    note_outcome(target, outcome, data)


def _file(data: bytes, suffix: str) -> Path:
    path = _WORKDIR / f"input{suffix}"
    path.write_bytes(data)
    return path


def mesh_config_input(data: bytes) -> None:
    rss = rss_bytes()
    suffix = ".json" if data[:1] in (b"{", b" ") else ".yaml"
    _outcome("mesh-config", data, lambda: LocalConfig.load(_file(data, suffix)), ConfigError)
    assert rss_bytes() - rss < RSS_GROWTH_LIMIT


def experiment_spec_input(data: bytes) -> None:
    rss = rss_bytes()
    path = _file(data, ".yaml")
    _outcome(
        "experiment-spec",
        data,
        lambda: load_spec(path, available_modes=lambda: ["none"]),
        SpecError,
    )
    assert rss_bytes() - rss < RSS_GROWTH_LIMIT


def topology_spec_input(data: bytes) -> None:
    """A `testbed up` topology argument: loaded and planned (validated), never built."""
    spec = data.decode("utf-8", errors="replace")
    if ".py" in spec or "/" in spec:
        spec = spec.replace("/", "_").replace(".py", "_py")  # files are not imported here
    _outcome("topology-spec", data, lambda: plan(load_topology(spec)), TopologyError)


_topology_specs = st.builds(
    lambda name, params: ",".join([name, *params]).encode(),
    st.sampled_from(["two_nodes", "multi_node", "single_node", "reviews_waypoint", "", "nosuch"]),
    st.lists(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(["nodes", "pods", "rate", "delay", "x", "Nodes", ""]),
            st.one_of(
                st.sampled_from(["0", "-1", "2", "1e3", "true", "10mbit", "5ms", "nan", ""]),
                st.text(max_size=8),
                st.integers(-5, 300).map(str),
            ),
        ),
        max_size=3,
    ),
) | st.binary(max_size=40)


@given(st.one_of(mutated(MESH), _hostile))
def test_mesh_config_loads_or_says_why(data: bytes) -> None:
    mesh_config_input(data)


@given(st.one_of(mutated(SPEC), _hostile))
def test_experiment_spec_loads_or_says_why(data: bytes) -> None:
    experiment_spec_input(data)


@given(_topology_specs)
def test_topology_spec_loads_or_says_why(data: bytes) -> None:
    topology_spec_input(data)


def test_saved_seeds_still_load_or_fail_cleanly() -> None:
    replay("mesh-config", mesh_config_input)
    replay("experiment-spec", experiment_spec_input)
    replay("topology-spec", topology_spec_input)
