from pathlib import Path

import pytest

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
