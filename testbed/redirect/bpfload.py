"""Loading the ebpf mode's tc programs and attaching them, every pin owned by the run.

A run mounts a fresh bpffs at `<run dir>/bpf` (recorded as a manifest "mount" before it
is mounted) and pins nothing anywhere else, never under the host's /sys/fs/bpf. Each
loaded copy of the object gets its own folder there, `<bpffs>/<name>/progs/<program>` and
`<bpffs>/<name>/maps/<map>`, each pin recorded before bpftool creates it. Teardown
unlinks the pins, removes the folder and unmounts the bpffs; deleting a namespace drops
the tc filters on its devices.

Loading happens before any attaching and is all-or-nothing: a program the verifier
rejects raises BpfLoadError with the verifier's words, and leaves nothing pinned and
nothing attached.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.netlab import Lab, NetlabError, Netns, links
from testbed.netlab.errors import TestbedError
from testbed.redirect import tcx
from testbed.redirect.bpfmaps import MAP_NAMES, PinnedMaps
from testbed.redirect.tcx import Direction

BPF_DIR = Path(__file__).parent / "bpf"
OBJECT = BPF_DIR / "ambient_redirect.bpf.o"
BUILD_COMMAND = "scripts/build_bpf.sh"
PROGRAMS = ("app_outbound", "app_inbound", "ztunnel_host_ingress", "ztunnel_tproxy")
FILTER_PREF = "1"  # one filter of ours per hook; `replace` keeps attaching idempotent
VERIFIER_LOG_LINES = 30
KERNEL_NAME_LEN = 15  # BPF_OBJ_NAME_LEN - 1


class BpfLoadError(TestbedError, RuntimeError):
    """The programs could not be built, loaded (verifier) or attached."""


def object_path(obj: Path = OBJECT) -> Path:
    if not obj.exists():
        raise BpfLoadError(f"{obj} is not built: run `make setup` (or {BUILD_COMMAND})")
    return obj


def mount_bpffs(lab: Lab) -> Path:
    """A fresh bpffs at <run dir>/bpf, recorded in the run manifest before mounting."""
    path = lab.workdir / "bpf"
    path.mkdir(mode=0o700)
    lab.manifest.record("mount", path=str(path))
    _run(["mount", "-t", "bpf", "bpf", str(path)], f"mounting a bpffs at {path}")
    return path


@dataclass(frozen=True)
class LoadedObject:
    """One loaded copy of the object: its pinned programs and maps."""

    dir: Path

    def program(self, name: str) -> Path:
        return self.dir / "progs" / name

    @property
    def maps(self) -> PinnedMaps:
        return PinnedMaps(self.dir / "maps")


def load_object(
    lab: Lab,
    bpffs: Path,
    name: str,
    obj: Path = OBJECT,
    programs: Sequence[str] = PROGRAMS,
    maps: Sequence[str] = MAP_NAMES,
) -> LoadedObject:
    """Load every program of `obj` (type classifier) and pin it and its maps."""
    loaded = LoadedObject(bpffs / name)
    lab.manifest.record("dir", path=str(loaded.dir))
    for program in programs:
        lab.manifest.record("bpf_pin", path=str(loaded.program(program)))
    for map_name in maps:
        lab.manifest.record("bpf_pin", path=str(loaded.maps.path(map_name)))
    loaded.dir.mkdir()
    argv = ["bpftool", "prog", "loadall", str(object_path(obj)), str(loaded.dir / "progs")]
    argv += ["type", "classifier", "pinmaps", str(loaded.dir / "maps")]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(loaded.dir, ignore_errors=True)  # bpftool may have pinned some maps
        raise BpfLoadError(_load_failure(obj, done.stderr))
    return loaded


def _load_failure(obj: Path, stderr: str) -> str:
    lines = stderr.strip().splitlines()
    shown = lines[-VERIFIER_LOG_LINES:]
    cut = f"(last {len(shown)} of {len(lines)} lines)\n" if len(lines) > len(shown) else ""
    return f"the kernel rejected {obj.name} (BPF verifier/loader), nothing attached:\n{cut}" + (
        "\n".join(shown)
    )


def program_id(pin: Path) -> int:
    """The kernel's id of a pinned program (as `bpftool prog show` lists it)."""
    done = subprocess.run(
        ["bpftool", "-j", "prog", "show", "pinned", str(pin)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BpfLoadError(f"no program pinned at {pin}: {done.stderr.strip()}")
    return int(json.loads(done.stdout)["id"])


def loaded_program_ids() -> set[int]:
    done = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    return {int(p["id"]) for p in json.loads(done.stdout or "[]")}


def attach(
    ns: Netns, dev: str, direction: Direction, program: Path, *, link_pin: Path | None = None
) -> None:
    """Attach a pinned program to `dev` in `ns`: as a tcx link pinned at `link_pin` when
    one is given, else as a tc clsact direct-action filter."""
    if link_pin is not None:
        with ns.entered():
            tcx.attach_link(program, _ifindex(ns, dev), direction, link_pin)
        return
    _ns_run(ns, ["tc", "qdisc", "replace", "dev", dev, "clsact"], f"clsact on {dev}")
    argv = ["tc", "filter", "replace", "dev", dev, direction, "pref", FILTER_PREF]
    argv += ["handle", "1", "bpf", "da", "pinned", str(program)]
    _ns_run(ns, argv, f"attaching {program.name} to {dev} {direction}")


def detach(ns: Netns, dev: str, direction: Direction, *, link_pin: Path | None = None) -> None:
    """Remove our program from a hook; a device that is gone already counts as done."""
    if link_pin is not None:
        link_pin.unlink(missing_ok=True)  # the last reference to the link: it detaches
        return
    argv = ["tc", "filter", "del", "dev", dev, direction, "pref", FILTER_PREF]
    ns.run(argv, check=False)


def tcx_available(ns: Netns, dev: str) -> bool:
    with ns.entered():
        return tcx.supported(_ifindex(ns, dev))


def attached_programs(ns: Netns, dev: str, direction: Direction) -> list[str]:
    """Names of the BPF programs on one hook of `dev`: tc filters, then tcx links (whose
    kernel names are cut at 15 characters, given in full when they are ours)."""
    done = ns.run(["tc", "-j", "filter", "show", "dev", dev, direction], check=False)
    names = parse_filter_names(done.stdout) if done.returncode == 0 else []
    try:
        with ns.entered():
            ids = tcx.attached_ids(_ifindex(ns, dev), direction)
    except (tcx.TcxError, NetlabError):
        ids = []  # no tcx in this kernel, or the device is gone
    return names + [full_program_name(program_name(i)) for i in ids]


def program_name(prog_id: int) -> str:
    done = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return str(json.loads(done.stdout or "{}").get("name", f"id {prog_id}"))


def full_program_name(kernel_name: str) -> str:
    return next((p for p in PROGRAMS if p[:KERNEL_NAME_LEN] == kernel_name), kernel_name)


def _ifindex(ns: Netns, dev: str) -> int:
    with ns.iproute() as ipr:
        return links.ifindex(ipr, dev)


def parse_filter_names(text: str) -> list[str]:
    """tc names a filter attached from a pin `<pin name>:[*fsobj]`; kernel program names
    are cut at 15 characters, so the pin name is the one to report."""
    filters = json.loads(text or "[]")
    names = [f["options"]["bpf_name"] for f in filters if "bpf_name" in f.get("options", {})]
    return [name.split(":", 1)[0] for name in names]


def _ns_run(ns: Netns, argv: list[str], what: str) -> None:
    done = ns.run(argv, check=False)
    if done.returncode != 0:
        raise BpfLoadError(f"{what} in {ns.name}: {done.stderr.strip()}")


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BpfLoadError(f"{what}: {done.stderr.strip()}")
