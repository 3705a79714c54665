"""Shared parts of the fuzz targets: the input counter, the seed corpus and an RSS probe.

Two ways to run (`tests/fuzz/conftest.py` picks the hypothesis profile):
- CI (`pytest tests`): profile "ci", derandomized, a few hundred examples per target, plus
  a replay of every seed saved in tests/fuzz/corpus/<target>/.
- `make fuzz`: profile "fuzz", FUZZ_EXAMPLES inputs per target (100,000), random; inputs
  that show a new outcome (an exception type, a status, an error code) are saved as seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
SUMMARY = Path(os.environ.get("FUZZ_SUMMARY", "/tmp/testbed-fuzz-summary.json"))
SAVE_SEEDS = os.environ.get("FUZZ_PROFILE") == "fuzz"
MAX_SEEDS = 200  # per target: enough to replay every outcome class quickly in CI

inputs_tried: Counter[str] = Counter()
_outcomes: dict[str, set[str]] = {}


def tried(target: str) -> None:
    inputs_tried[target] += 1


def note_outcome(target: str, outcome: str, data: bytes) -> None:
    """Save `data` as a seed the first time `outcome` is seen for `target` (fuzz runs)."""
    seen = _outcomes.setdefault(target, set())
    if outcome in seen:
        return
    seen.add(outcome)
    if not SAVE_SEEDS:
        return
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    if sum(1 for _ in folder.iterdir()) >= MAX_SEEDS:
        return
    (folder / f"{hashlib.sha1(data).hexdigest()[:16]}.bin").write_bytes(data)


def seeds(target: str) -> Iterator[bytes]:
    folder = CORPUS / target
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            yield path.read_bytes()


def replay(target: str, one_input: Callable[[bytes], None]) -> int:
    count = 0
    for data in seeds(target):
        one_input(data)
        count += 1
    return count


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def write_summary() -> None:
    if not inputs_tried:
        return
    previous = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    previous.update(inputs_tried)
    SUMMARY.write_text(json.dumps(previous, indent=1, sort_keys=True) + "\n")
