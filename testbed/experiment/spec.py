"""Experiment specs: YAML files under experiments/, validated with pydantic.

A spec names a topology, the redirection modes to compare, the workloads and their
sweeps, where client and server sit (placement), the CPU pinning policy, and how long and
how often each case runs. Errors name the file, the field and what was expected, because
the person reading them is editing a YAML file, not Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from testbed.netlab.document import DocumentError, load_document

# Every mode the design knows (DESIGN.md section 4); which of them exist on this machine
# is asked of testbed.redirect at run time.
KNOWN_MODES = ("none", "sidecar", "inpod", "legacy", "ebpf")
Workload = Literal["tcp_stream", "tcp_rr", "tcp_crr", "http_fixed_qps"]
Placement = Literal["same-node", "cross-node"]
Pinning = Literal["none", "split"]


class SpecError(Exception):
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

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in KNOWN_MODES:
            raise ValueError(f"unknown mode {value!r}; expected one of {', '.join(KNOWN_MODES)}")
        return value

    @model_validator(mode="after")
    def _default_label(self) -> ModeSpec:
        if not self.label:
            object.__setattr__(self, "label", self.mode)
        return self


class Sweeps(_Strict):
    """Parameter axes; each workload sweeps the ones that apply to it (see case_parameters)."""

    msg_sizes: list[PositiveInt] = Field(default_factory=lambda: [64], min_length=1)
    parallel: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    connections: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    qps: list[PositiveInt] = Field(default_factory=lambda: [1000], min_length=1)


class ExperimentSpec(_Strict):
    """An experiment; see experiments/default.yaml for a commented example.

    topology: a name ("two_nodes") or {name, params}; modes: names, {mode, label, options}
    items, or "all"; sweeps apply per workload: tcp_stream -> parallel, tcp_rr and tcp_crr
    -> msg_sizes, http_fixed_qps -> connections x qps. warmup and duration are whole
    seconds per case; every case runs `repetitions` times on a fresh cluster per mode.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    topology: TopologySpec
    modes: list[ModeSpec] = Field(min_length=1)
    workloads: list[Workload] = Field(min_length=1)
    sweeps: Sweeps = Field(default_factory=Sweeps)
    placements: list[Placement] = Field(min_length=1)
    pinning: Pinning = "none"
    repetitions: PositiveInt = 3
    # Whole seconds: iperf3 and sockperf take nothing finer.
    warmup: NonNegativeInt = 1
    duration: PositiveInt = 5
    http_payload: PositiveInt = 1024
    sample_interval: PositiveFloat = 0.5

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


def _format_location(location: Sequence[int | str]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid experiment spec"]
    for item in error.errors():
        field = _format_location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        got = "" if item["type"] == "missing" else f" (got {item['input']!r})"
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)


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
        data["modes"] = list(available_modes())
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(path, exc)) from exc
    if available_modes is not None:
        _check_available(path, spec, list(available_modes()))
    return spec


def _check_available(path: Path, spec: ExperimentSpec, available: list[str]) -> None:
    for index, mode in enumerate(spec.modes):
        if mode.mode not in available:
            raise SpecError(
                f"{path}: modes[{index}]: mode {mode.mode!r} is not available on this machine; "
                f"expected one of {', '.join(available)}"
            )
