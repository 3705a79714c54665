import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.netlab import lab as lab_module
from testbed.netlab.lab import Lab, clean_run
from testbed.netlab.manifest import ManifestError, RunManifest, list_runs


def test_records_survive_a_torn_last_line(tmp_path: Path) -> None:
    manifest = RunManifest.create("abc", tmp_path)
    manifest.record("file", path="/tmp/x")
    with open(manifest.path, "a") as out:
        out.write('{"kind": "netns", "na')  # a crash mid-write
    assert [e.kind for e in manifest.entries()] == ["file"]


def test_names_are_checked_and_unique(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="invalid run name"):
        RunManifest.create("Bad_Name", tmp_path)
    RunManifest.create("one", tmp_path)
    with pytest.raises(ManifestError, match="exists already"):
        RunManifest.create("one", tmp_path)
    assert [m.run for m in list_runs(tmp_path)] == ["one"]


def test_clean_removes_exactly_what_was_recorded(tmp_path: Path) -> None:
    lab = Lab.create("files", tmp_path)
    mine = lab.add_file(tmp_path / "mine.txt")
    mine.write_text("x")
    other = tmp_path / "other.txt"
    other.write_text("not recorded")
    report = clean_run(lab.manifest)
    assert not mine.exists()
    assert other.exists()
    assert not lab.manifest.dir.exists()
    assert report.errors == []


class _Shutil:
    def __init__(self, rmtree: Callable[[Path], None]) -> None:
        self.rmtree = rmtree


def _rmtree_failing(times: int, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """shutil.rmtree as seen while a run's own process writes into its folder."""
    real, calls = shutil.rmtree, []

    def rmtree(path: Path) -> None:
        calls.append(path)
        if len(calls) <= times:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        real(path)

    monkeypatch.setattr(lab_module, "shutil", _Shutil(rmtree))
    return calls


def test_clean_tries_again_while_the_run_still_writes_into_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.create("busy", tmp_path)
    calls = _rmtree_failing(2, monkeypatch)
    report = clean_run(lab.manifest)
    assert report.errors == [] and len(calls) == 3
    assert not lab.manifest.dir.exists()


def test_clean_says_so_when_the_folder_never_empties(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab.create("busier", tmp_path)
    _rmtree_failing(10_000, monkeypatch)
    report = clean_run(lab.manifest)
    (error,) = report.errors
    assert "Directory not empty" in error and "still writing" in error
    assert lab.manifest.dir.exists()
