"""Experiment specs: YAML files under experiments/, validated with pydantic.

A spec names a topology, the redirection modes to compare, the workloads and their
sweeps, where client and server sit (placement), the CPU pinning policy, and how long and
how often each case runs. Errors name the file, the field and what was expected, because
the person reading them is editing a YAML file, not Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from testbed.cluster.mode import ModeError
from testbed.experiment.steadiness import DEFAULT_MAX_CV, AutoRule
from testbed.netlab.document import DocumentError, load_document
from testbed.netlab.errors import TestbedError
from testbed.redirect import registry

Workload = Literal["tcp_stream", "tcp_rr", "tcp_crr", "http_fixed_qps", "http_crr"]
# How far into the mesh a case's traffic goes (docs/architecture.md): `direct` is mode none;
# `capture` redirects the client's traffic to its proxy with the server out of the mesh
# (plain TCP passthrough); `hbone` has both ends enrolled; `waypoint` adds a waypoint.
DataPath = Literal["direct", "capture", "hbone", "waypoint"]
DATA_PATHS: tuple[str, ...] = ("direct", "capture", "hbone", "waypoint")
# Without `paths:`, a spec measures what it did before paths existed: none, and the rest
# with both ends in the mesh.
DEFAULT_PATHS: tuple[DataPath, ...] = ("direct", "hbone")
# Modes that can send through a waypoint (L7): those that start the topology's waypoints.
L7_MODES = tuple(name for name, mode in registry.MODES.items() if mode.runs_waypoints)
# Request/response sizes the workloads take (64 B .. 64 KiB in the shipped specs).
MAX_MSG_SIZE = 65536
Placement = Literal["same-node", "cross-node"]
Pinning = Literal["none", "split"]
# Peers measured beside the modes, on a `none` cluster: `native` is HAProxy as an mTLS TCP
# tunnel with the mesh's certificates on the pod -> node -> node -> pod path
# (testbed.bench.native). Not a redirection mode: nothing is captured.
Peer = Literal["native"]
MAX_REPETITIONS = 30
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class SpecError(TestbedError):
    """An experiment spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopologySpec(_Strict):
    name: str = Field(min_length=1)
    params: dict[str, int | float | str] = Field(default_factory=dict)

    def as_argument(self) -> str:
        """The form load_topology() takes: "multi_node,nodes=3,pods=10"."""
        return ",".join([self.name, *(f"{key}={value}" for key, value in self.params.items())])


class ModeSpec(_Strict):
    mode: str
    label: str = ""
    options: dict[str, Any] = Field(default_factory=dict)
    # This mode's paths instead of the spec's `paths` (e.g. sidecar without `waypoint`).
    paths: list[DataPath] | None = None

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        known = registry.available_modes()  # the registry is the one list of modes
        if value not in known:
            raise ValueError(f"unknown mode {value!r}; expected one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _valid_options(self) -> ModeSpec:
        try:
            registry.create_mode(self.mode, self.options)
        except ModeError as exc:
            raise ValueError(f"options: {exc}") from None
        return self

    @model_validator(mode="after")
    def _default_label(self) -> ModeSpec:
        if not self.label:
            object.__setattr__(self, "label", self.mode)
        return self


def _seconds(value: object) -> object:
    """ "90s", "5m", "1h" or a number of seconds; anything else is left for pydantic to
    reject as "not a number"."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("expected seconds or a duration like 90s, 5m, 1h")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


class AutoRepetitions(_Strict):
    """`repetitions: {auto: {min, max, cv, budget}}` (or `repetitions: auto` for these
    defaults): every case runs `min` times; a case that is then not steady (CV above `cv`,
    or bimodal: testbed.experiment.steadiness) gets one more repetition per round, up to
    `max`, while the run's `budget` (seconds, or "90s", "5m") for extra repetitions lasts."""

    min: int = Field(default=3, ge=2, le=MAX_REPETITIONS)
    max: int = Field(default=10, ge=2, le=MAX_REPETITIONS)
    cv: float = Field(default=DEFAULT_MAX_CV, gt=0, lt=1)
    budget: Annotated[float, BeforeValidator(_seconds), Field(gt=0)] = 300.0

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoRepetitions:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self

    def rule(self) -> AutoRule:
        return AutoRule(self.min, self.max, self.cv, self.budget)


def _unwrap_auto(value: object) -> object:
    if value == "auto":
        return {}
    if isinstance(value, dict) and set(value) == {"auto"}:
        return value["auto"] if value["auto"] is not None else {}
    raise ValueError("expected a whole number, 'auto' or {auto: {min, max, cv, budget}}")


def _repetitions_kind(value: object) -> str:
    return "auto" if value == "auto" or isinstance(value, dict | AutoRepetitions) else "count"


Repetitions = Annotated[
    Annotated[PositiveInt, Tag("count")]
    | Annotated[AutoRepetitions, BeforeValidator(_unwrap_auto), Tag("auto")],
    Discriminator(_repetitions_kind),
]


class Sweeps(_Strict):
    """Parameter axes; each workload sweeps the ones that apply to it (see case_parameters)."""

    msg_sizes: list[Annotated[int, Field(ge=1, le=MAX_MSG_SIZE)]] = Field(
        default_factory=lambda: [64], min_length=1
    )
    parallel: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    connections: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    qps: list[PositiveInt] = Field(default_factory=lambda: [1000], min_length=1)


class ExperimentSpec(_Strict):
    """An experiment; see experiments/default.yaml for a commented example.

    topology: a name ("two_nodes") or {name, params}; modes: names, {mode, label, options}
    items, or "all"; sweeps apply per workload: tcp_stream -> parallel, tcp_rr and tcp_crr
    -> msg_sizes, http_fixed_qps and http_crr -> connections x qps. paths: direct (mode
    none), capture, hbone, waypoint (L7 modes only); a mode runs the paths that apply to it,
    all on one cluster. warmup and duration are whole seconds per case; every case runs
    `repetitions` times, each mode on a fresh cluster. trace: one traced walk per mode and
    placement for the report, before the first case (testbed.experiment.walks).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    topology: TopologySpec
    modes: list[ModeSpec] = Field(min_length=1)
    workloads: list[Workload] = Field(min_length=1)
    sweeps: Sweeps = Field(default_factory=Sweeps)
    placements: list[Placement] = Field(min_length=1)
    paths: list[DataPath] = Field(default_factory=lambda: list(DEFAULT_PATHS), min_length=1)
    pinning: Pinning = "none"
    repetitions: Repetitions = 3
    peers: list[Peer] = Field(default_factory=list)
    # Whole seconds: iperf3 and sockperf take nothing finer.
    warmup: NonNegativeInt = 1
    duration: PositiveInt = 5
    http_payload: PositiveInt = 1024
    sample_interval: PositiveFloat = 0.5
    # One traced walk per mode and placement for the report (testbed.experiment.walks).
    trace: bool = True

    @field_validator("topology", mode="before")
    @classmethod
    def _topology_shorthand(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("modes", mode="before")
    @classmethod
    def _mode_shorthand(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"mode": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _unique_mode_labels(self) -> ExperimentSpec:
        labels = [mode.label for mode in self.modes]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"modes: labels must be unique, {', '.join(duplicates)} repeats; "
                "give repeated modes a distinct 'label'"
            )
        return self

    @model_validator(mode="after")
    def _peers_beside_none(self) -> ExperimentSpec:
        if self.peers and not any(mode.mode == "none" for mode in self.modes):
            raise ValueError(
                "peers: a peer runs on mode none's cluster, beside it; add none to modes"
            )
        if len(set(self.peers)) != len(self.peers):
            raise ValueError(f"peers: each peer once (got {self.peers})")
        if set(self.peers) & {mode.label for mode in self.modes}:
            raise ValueError("peers: a mode's label may not be a peer's name")
        return self

    @model_validator(mode="after")
    def _paths_apply(self) -> ExperimentSpec:
        for index, mode in enumerate(self.modes):
            paths = mode.paths if mode.paths is not None else self.paths
            field = f"modes[{index}].paths" if mode.paths is not None else "paths"
            if "waypoint" in paths and mode.mode not in (*L7_MODES, "none"):
                raise ValueError(
                    f"{field}: path 'waypoint' needs a mode with L7 ({', '.join(L7_MODES)}); "
                    f"mode {mode.mode!r} has none (give it its own paths: [capture, hbone])"
                )
            if mode.mode != "none" and not set(paths) - {"direct"}:
                raise ValueError(
                    f"{field}: mode {mode.mode!r} runs capture, hbone or waypoint, not only "
                    "direct (direct is mode none)"
                )
        return self

    @property
    def first_repetitions(self) -> int:
        """The repetitions every case runs (auto: its minimum)."""
        reps = self.repetitions
        return reps if isinstance(reps, int) else reps.min

    @property
    def auto(self) -> AutoRule | None:
        """The rule for extra repetitions, or None for a fixed count."""
        reps = self.repetitions
        return None if isinstance(reps, int) else reps.rule()

    def mode_paths(self, mode: ModeSpec) -> list[str]:
        """The paths a mode runs: `direct` for none (always: it is the baseline), the
        others for a meshed mode, in DATA_PATHS order."""
        if mode.mode == "none":
            return ["direct"]
        wanted = set(mode.paths if mode.paths is not None else self.paths)
        return [path for path in DATA_PATHS if path in wanted and path != "direct"]


def _format_location(location: Sequence[int | str]) -> str:
    if tuple(location[:2]) == ("repetitions", "count"):  # the tag of a plain count
        location = ["repetitions", *location[2:]]
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format_validation_error(path: Path, error: ValidationError) -> str:
    """One line for one problem, a header and a line per problem for several."""
    problems = []
    for item in error.errors():
        field = _format_location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error" and not item["loc"]:
            problems.append(message)  # a whole-spec check names its field itself
            continue
        got = "" if item["type"] == "missing" else f" (got {item['input']!r})"
        problems.append(f"{field}: {message}{got}")
    if len(problems) == 1:
        return f"{path}: invalid experiment spec: {problems[0]}"
    return "\n".join([f"{path}: invalid experiment spec", *(f"  {p}" for p in problems)])


def _read_mapping(path: Path) -> dict[str, Any]:
    try:  # bounded: not UTF-8, too deep, alias bombs are one error (found by fuzzing)
        data = load_document(path.read_bytes())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    except DocumentError as exc:
        raise SpecError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level")
    return data


def load_spec(
    path: Path, *, available_modes: Callable[[], Sequence[str]] | None = None
) -> ExperimentSpec:
    """Read and validate a spec.

    `modes: all` stands for every mode available_modes() reports. When available_modes is
    given, every mode the spec names must also be available on this machine.
    """
    data = _read_mapping(path)
    if data.get("modes") == "all":
        if available_modes is None:
            raise SpecError(f"{path}: modes: 'all' needs the list of available modes")
        data["modes"] = _all_modes(data, list(available_modes()))
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(path, exc)) from exc
    if available_modes is not None:
        _check_available(path, spec, list(available_modes()))
    return spec


def _all_modes(data: dict[str, Any], available: list[str]) -> list[str | dict[str, Any]]:
    """`modes: all`: every available mode; those without L7 leave out a `waypoint` path
    (naming such a mode yourself with a waypoint path is an error instead)."""
    paths = data.get("paths")
    if not isinstance(paths, list) or "waypoint" not in paths:
        return list(available)
    without = [path for path in paths if path != "waypoint"]
    return [
        mode if mode in (*L7_MODES, "none") else {"mode": mode, "paths": without}
        for mode in available
    ]


def _check_available(path: Path, spec: ExperimentSpec, available: list[str]) -> None:
    for index, mode in enumerate(spec.modes):
        if mode.mode not in available:
            raise SpecError(
                f"{path}: modes[{index}]: mode {mode.mode!r} is not available on this machine; "
                f"expected one of {', '.join(available)}"
            )
