"""scripts/build_bpf.sh: builds the programs, and stops with a message saying why not."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.redirect import bpfload

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_bpf.sh"
needs_toolchain = pytest.mark.skipif(
    shutil.which("clang") is None
    or shutil.which("bpftool") is None
    or not os.access("/sys/kernel/btf/vmlinux", os.R_OK),
    reason="needs clang, bpftool and the kernel's BTF",
)


def _build(folder: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)],
        env={**os.environ, "BPF_DIR": str(folder), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def _sources(tmp_path: Path) -> Path:
    for name in ("ambient_redirect.bpf.c", "ambient_maps.h"):
        shutil.copy(bpfload.BPF_DIR / name, tmp_path / name)
    return tmp_path


def test_missing_clang_is_named(tmp_path: Path) -> None:
    done = _build(_sources(tmp_path), CLANG="/nonexistent/clang")
    assert done.returncode == 1
    assert "clang not found" in done.stderr


@needs_toolchain
def test_builds_the_object_then_reports_a_compile_error(tmp_path: Path) -> None:
    folder = _sources(tmp_path)
    built = _build(folder)
    assert built.returncode == 0, built.stderr
    assert (folder / "ambient_redirect.bpf.o").stat().st_size > 0
    assert "struct __sk_buff {" in (folder / "vmlinux.h").read_text()
    source = folder / "ambient_redirect.bpf.c"
    source.write_text(source.read_text() + "\nthis is not C;\n")
    broken = _build(folder)
    assert broken.returncode == 1
    assert "could not compile ambient_redirect.bpf.c" in broken.stderr
    assert "error:" in broken.stderr  # clang's own diagnostics are shown
    assert not (folder / "ambient_redirect.bpf.o").exists()  # no stale object left to load
