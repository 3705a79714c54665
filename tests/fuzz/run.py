"""`make fuzz`: every fuzz target for at least FUZZ_INPUTS inputs (100,000), each bounded
in time (FUZZ_SECONDS), seeds kept in tests/fuzz/corpus/<target>/.

Pure parsers run under atheris (libFuzzer's coverage guidance over the instrumented
testbed modules) when it is installed; servers, whose code runs in another thread or
process, run under hypothesis's structured strategies in the "fuzz" profile. Targets run
as parallel processes; a finding fails the run and leaves its input in FUZZ_ARTIFACTS.

    python tests/fuzz/run.py [TARGET...]          (all targets when none is named)
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
INPUTS = int(os.environ.get("FUZZ_INPUTS", "100000"))
SECONDS = float(os.environ.get("FUZZ_SECONDS", "2700"))
ARTIFACTS = Path(os.environ.get("FUZZ_ARTIFACTS", "/tmp/testbed-fuzz-artifacts"))
BATCH = int(os.environ.get("FUZZ_BATCH", "16"))  # inputs per hypothesis example (fuzz_support)

# name -> (module, function): `function(data: bytes)` checks one input
ATHERIS = {
    "zds": ("test_fuzz_zds", "one_input"),
    "http1-parser": ("test_fuzz_http1", "one_input"),
    "mesh-config": ("test_fuzz_loaders", "mesh_config_input"),
    "experiment-spec": ("test_fuzz_loaders", "experiment_spec_input"),
    "topology-spec": ("test_fuzz_loaders", "topology_spec_input"),
}
# name -> (pytest node, inputs per example)
HYPOTHESIS = {
    "zds-client": ("test_fuzz_zds.py::test_client_nacks_what_it_cannot_read_and_reconnects", BATCH),
    "http1-server": (
        "test_fuzz_http1.py::test_server_answers_garbage_with_its_status_and_closes",
        BATCH,
    ),
    "waypoint-h2": (
        "test_fuzz_waypoint_h2.py::test_hostile_http2_is_refused_with_goaway_and_others_flow",
        BATCH,
    ),
    "hbone": (
        "test_fuzz_hbone.py::test_hostile_http2_after_tls_closes_only_that_connection",
        BATCH,
    ),
}
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def atheris_child(name: str, workdir: str) -> None:
    """In the child process: fuzz `name` with atheris, corpus in `workdir`."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["testbed"]):
        import testbed.cluster.loader
        import testbed.experiment.spec
        import testbed.mesh.config
        import testbed.mesh.waypoint.h1codec
        import testbed.mesh.zds  # noqa: F401
    module, function = ATHERIS[name]
    one_input = getattr(__import__(module), function)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / name
    seeds.mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={INPUTS}",
            f"-max_total_time={int(SECONDS)}",
            "-max_len=4096",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={ARTIFACTS}/{name}-",
            "-print_final_stats=1",
            workdir,
            str(seeds),
        ],
        one_input,
    )
    atheris.Fuzz()


def atheris_merge_child(name: str, workdir: str) -> None:
    """Keep in the committed corpus only the inputs that add coverage to it."""
    import atheris

    sys.path.insert(0, str(HERE))
    module, function = ATHERIS[name]
    with atheris.instrument_imports(include=["testbed"]):
        one_input = getattr(__import__(module), function)
    atheris.Setup([sys.argv[0], "-merge=1", str(CORPUS / name), workdir], one_input)
    atheris.Fuzz()


def start(name: str, logs: Path) -> tuple[subprocess.Popen[bytes], Path, str | None]:
    log = logs / f"{name}.log"
    env = {**os.environ, "FUZZ_SECONDS": str(SECONDS), "FUZZ_PROFILE": "fuzz"}
    env["FUZZ_BATCH"] = str(BATCH)
    if name in ATHERIS and have_atheris():
        workdir = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
        argv = [sys.executable, __file__, "--atheris-child", name, workdir]
    else:
        workdir = None
        node, per_example = HYPOTHESIS.get(name, (None, 1))
        if node is None:  # an atheris target without atheris: its hypothesis tests
            node = f"{ATHERIS[name][0]}.py"
        env["FUZZ_EXAMPLES"] = str(math.ceil(INPUTS / per_example))
        env["FUZZ_SUMMARY"] = str(logs / f"{name}.json")
        argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        argv += ["--timeout", str(int(SECONDS) + 600), "-k", "not seeds", str(HERE / node)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log, workdir


def inputs_of(name: str, log: Path) -> int:
    if name in ATHERIS and have_atheris():
        found = _DONE.findall(log.read_text(errors="replace"))
        return int(found[-1][0]) if found else 0
    summary = log.with_suffix(".json")
    counts = json.loads(summary.read_text()) if summary.exists() else {}
    return int(counts.get(name, 0))


def main(names: list[str]) -> int:
    logs = Path(tempfile.mkdtemp(prefix="testbed-fuzz-logs-"))
    names = names or [*ATHERIS, *HYPOTHESIS]
    started = time.monotonic()
    running = {name: start(name, logs) for name in names}
    failed = []
    for name, (proc, _log, workdir) in running.items():
        code = proc.wait()
        if code != 0:
            failed.append(name)
        if workdir is not None:
            subprocess.run(
                [sys.executable, __file__, "--merge-child", name, workdir],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
    print(f"{'target':18} {'engine':10} {'inputs':>9}  result   (logs in {logs})")
    for name, (_proc, log, _) in running.items():
        engine = "atheris" if name in ATHERIS and have_atheris() else "hypothesis"
        count = inputs_of(name, log)
        verdict = "FINDING" if name in failed else "ok"
        print(f"{name:18} {engine:10} {count:>9,}  {verdict}")
    seeds = sum(1 for _ in CORPUS.rglob("*") if _.is_file())
    print(f"{len(names)} targets in {time.monotonic() - started:.0f} s; {seeds} seeds in {CORPUS}")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--atheris-child"]:
        atheris_child(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--merge-child"]:
        atheris_merge_child(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main(sys.argv[1:]))
