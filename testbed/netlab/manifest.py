"""The run manifest: what a testbed run created, written before it is created.

Each run owns /run/testbed/<run>/. `manifest.jsonl` gets one JSON object per resource
(namespace, process, file, directory, socket, BPF pin) appended and flushed *before* the
resource exists, so that a crash at any point leaves a manifest naming everything that may
exist. Cleanup walks it backwards and removes exactly those things, nothing found by
pattern.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.netlab.errors import TestbedError

RUNS_ROOT = Path(os.environ.get("TESTBED_RUN_ROOT", "/run/testbed"))
RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")

KINDS = ("netns", "process", "file", "dir", "socket", "bpf_pin", "mount")


class ManifestError(TestbedError):
    """A run name or manifest problem the user can act on."""


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name):
        raise ManifestError(
            f"invalid run name {name!r}: expected 1-12 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Entry:
    kind: str
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


class RunManifest:
    """Append-only record of one run's resources."""

    def __init__(self, run: str, root: Path = RUNS_ROOT) -> None:
        self.run = check_run_name(run)
        self.dir = root / run
        self.path = self.dir / "manifest.jsonl"

    @classmethod
    def create(cls, run: str, root: Path = RUNS_ROOT) -> RunManifest:
        manifest = cls(run, root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            manifest.dir.mkdir(mode=0o700)
        except FileExistsError:
            raise ManifestError(
                f"a testbed named {run!r} exists already ({manifest.dir}); "
                f"choose another --name or remove it with 'testbed clean {run}'"
            ) from None
        manifest.path.touch()
        return manifest

    @classmethod
    def open(cls, run: str, root: Path = RUNS_ROOT) -> RunManifest:
        manifest = cls(run, root)
        if not manifest.path.exists():
            raise ManifestError(f"no testbed named {run!r} (no {manifest.path})")
        return manifest

    def record(self, kind: str, **fields: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown manifest kind {kind!r}")
        line = json.dumps({"kind": kind, **fields}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())

    def entries(self) -> list[Entry]:
        result = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash names nothing that was created
            kind = data.pop("kind", None)
            if kind in KINDS:
                result.append(Entry(kind, data))
        return result

    def state_file(self, name: str) -> Path:
        return self.dir / name


def list_runs(root: Path = RUNS_ROOT) -> Iterator[RunManifest]:
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if (child / "manifest.jsonl").exists() and RUN_NAME.match(child.name):
            yield RunManifest(child.name, root)
