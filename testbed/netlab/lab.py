"""A Lab owns one run: its manifest, namespaces, processes and files, and their teardown."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.netlab import nsutil
from testbed.netlab.interrupt import raise_if_requested
from testbed.netlab.manifest import RUNS_ROOT, Entry, RunManifest, list_runs
from testbed.netlab.netns import Netns
from testbed.netlab.process import ManagedProcess, NetlabError, stop_recorded_process
from testbed.netlab.reap import end_processes_in, opened_netns

_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


class Lab:
    """Creates resources for one run, recording each in the manifest first."""

    def __init__(self, manifest: RunManifest) -> None:
        self.manifest = manifest
        self.run = manifest.run
        self.prefix = f"tb-{manifest.run}"
        self.processes: list[ManagedProcess] = []
        self._log_counter = 0

    @classmethod
    def create(cls, run: str, root: Path = RUNS_ROOT) -> Lab:
        lab = cls(RunManifest.create(run, root))
        lab.manifest.record("dir", path=str(lab.manifest.dir))
        return lab

    @classmethod
    def attach(cls, run: str, root: Path = RUNS_ROOT) -> Lab:
        """A Lab for an existing run (for `exec`, `down`), creating nothing."""
        return cls(RunManifest.open(run, root))

    @property
    def workdir(self) -> Path:
        return self.manifest.dir

    def netns_name(self, *parts: str) -> str:
        return "-".join([self.prefix, *parts])

    def add_netns(self, *parts: str) -> Netns:
        raise_if_requested()
        name = self.netns_name(*parts)
        self.manifest.record("netns", name=name)
        try:
            nsutil.create_netns(name)
        except FileExistsError:
            raise NetlabError(f"network namespace {name} exists already") from None
        return self.netns(name)

    def netns(self, name: str) -> Netns:
        """A handle on a namespace of this run whose spawned processes are recorded."""
        return Netns(name, on_spawn=self._before_spawn, on_started=self._after_spawn)

    def _before_spawn(self, label: str, argv: Sequence[str]) -> Path:
        self._log_counter += 1
        safe = _LABEL.sub("_", label)
        log = self.workdir / f"{safe}.{os.getpid()}.{self._log_counter}.log"
        self.manifest.record("file", path=str(log))
        return log

    def _after_spawn(self, proc: ManagedProcess) -> None:
        self.manifest.record("process", pid=proc.pid, start_time=proc.start_time, label=proc.label)
        self.processes.append(proc)

    def add_file(self, path: Path) -> Path:
        self.manifest.record("file", path=str(path))
        return path

    def add_dir(self, path: Path) -> Path:
        self.manifest.record("dir", path=str(path))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_socket(self, path: Path) -> Path:
        self.manifest.record("socket", path=str(path))
        return path

    def teardown(self) -> TeardownReport:
        for proc in reversed(self.processes):
            proc.terminate(timeout=3.0)
        return clean_run(self.manifest)


@dataclass
class TeardownReport:
    run: str
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _remove(entry: Entry) -> str | None:
    """Remove one recorded resource; returns a description if something was removed."""
    if entry.kind == "process":
        if stop_recorded_process(entry["pid"], entry["start_time"]):
            return f"process {entry['pid']} ({entry.fields.get('label', '?')})"
        return None
    if entry.kind == "netns":
        return f"netns {entry['name']}" if nsutil.delete_netns(entry["name"]) else None
    if entry.kind == "mount":
        return f"mount {entry['path']}" if nsutil.unmount(entry["path"]) else None
    path = Path(entry["path"])
    if entry.kind == "dir":
        if path.is_dir():
            shutil.rmtree(path)
            return f"dir {path}"
        return None
    if path.exists() or path.is_symlink():
        path.unlink()
        return f"{entry.kind} {path}"
    return None


def clean_run(manifest: RunManifest) -> TeardownReport:
    """Remove everything a run's manifest names, newest first; then the manifest itself.

    Processes go first whatever their position, so that no recorded process keeps a
    namespace or file busy; then every other process inside the run's namespaces (a
    daemon a user started in a pod), so that no namespace outlives its name.
    """
    report = TeardownReport(manifest.run)
    entries = list(reversed(manifest.entries()))
    for entry in (e for e in entries if e.kind == "process"):
        _remove_into(report, entry)
    others = [e for e in entries if e.kind != "process"]
    paths = [nsutil.netns_path(e["name"]) for e in others if e.kind == "netns"]
    try:
        with opened_netns(paths) as owned:
            reaped = end_processes_in(owned)
            report.removed.extend(reaped.ended)
            report.errors.extend(f"{text}: alive after SIGKILL" for text in reaped.survivors)
            for entry in others:
                if entry.kind == "dir" and Path(entry["path"]) == manifest.dir:
                    continue  # the manifest goes last, only if everything else went
                if entry.kind == "netns" and nsutil.netns_path(entry["name"]) in reaped.pinned:
                    continue  # kept named (and in the manifest) until its process is gone
                _remove_into(report, entry)
    except OSError as exc:
        report.errors.append(f"the run's namespaces: {exc}")
    if not report.errors:
        _remove_manifest_dir(report, manifest.dir)
    return report


MANIFEST_DIR_TRIES = 20


def _remove_manifest_dir(report: TeardownReport, directory: Path) -> None:
    """Remove the run's folder. Cleaned from another process, a run whose own process is
    still alive (an experiment between cases) may write a file there while it goes: try
    again for a moment, then say so instead of failing."""
    for _ in range(MANIFEST_DIR_TRIES):
        try:
            shutil.rmtree(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            error = exc
            time.sleep(0.05)
    report.errors.append(f"{directory}: {error} (is the run's own process still writing to it?)")


def _remove_into(report: TeardownReport, entry: Entry) -> None:
    try:
        removed = _remove(entry)
    except OSError as exc:
        report.errors.append(f"{entry.kind} {entry.fields}: {exc}")
        return
    if removed:
        report.removed.append(removed)


def clean_all(root: Path = RUNS_ROOT) -> list[TeardownReport]:
    return [clean_run(manifest) for manifest in list_runs(root)]
