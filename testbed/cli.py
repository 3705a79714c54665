"""The `testbed` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from testbed.cluster.loader import parse_value
from testbed.netlab import NetlabError, interrupt
from testbed.netlab.errors import TestbedError
from testbed.netlab.manifest import RUNS_ROOT, list_runs

console = Console()
err_console = Console(stderr=True)


class UsageError(TestbedError):
    """A mistake on the command line."""


# -- doctor ---------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from testbed.netlab.features import detect_features
    from testbed.redirect.istio_ztunnel import detect_istio_ztunnel
    from testbed.trace import detect_tracing

    features = [*detect_features(), *detect_tracing(), detect_istio_ztunnel()]
    if args.json:
        print(json.dumps([f.as_dict() for f in features], indent=2))
    else:
        table = Table("feature", "status", "detail", "needed by", title="testbed doctor")
        for f in features:
            status = (
                "[green]ok[/green]"
                if f.ok
                else ("[red]MISSING[/red]" if f.essential else "[yellow]missing[/yellow]")
            )
            table.add_row(f.name, status, f.detail, f.needed_by)
        console.print(table)
        fallbacks = [f for f in features if f.name == "geneve" and not f.ok]
        if fallbacks:
            console.print("legacy mode will use VXLAN tunnels (tunnel=vxlan): no geneve here")
    missing = [f.name for f in features if f.essential and not f.ok]
    if missing:
        err_console.print(f"essential features missing: {', '.join(missing)}")
        return 1
    return 0


# -- up / ls / inspect / exec / down / clean -----------------------------------------------
def _mode_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected key=value")
        options[key] = parse_value(value)
    if args.inpod_variant:
        options["inpod_variant"] = args.inpod_variant
    return options


def cmd_up(args: argparse.Namespace) -> int:
    from testbed.cluster.cluster import Cluster
    from testbed.inventory import inventory_tables, summary_line
    from testbed.redirect import create_mode
    from testbed.shell import ClusterShell

    started = time.monotonic()
    mode = create_mode(args.mode, _mode_options(args))  # a bad option: nothing is built
    cluster = Cluster(args.topology, mode, name=args.name, root=args.root)
    cluster.start()
    inv = cluster.inventory()
    console.print(f"{summary_line(inv)} (built in {time.monotonic() - started:.1f} s)")
    _warn_stopped_apps(inv)
    if args.detach:
        console.print(
            f"left running; 'testbed inspect {cluster.run}', "
            f"'testbed exec {cluster.run} POD -- CMD', 'testbed down {cluster.run}'"
        )
        return 0
    try:
        for _, table in inventory_tables(inv):
            console.print(table)
        ClusterShell(cluster, console).cmdloop()
    finally:
        cluster.stop()
    return 0


def _warn_stopped_apps(inv: dict[str, Any]) -> None:
    """An app that exited is said, never hidden (nothing restarts it)."""
    for app in inv.get("apps", []):
        if app["state"] != "running":
            code = app.get("exit_code")
            err_console.print(
                f"app {app['app']} of pod {app['pod']} {app['state']}"
                + (f" with code {code}" if code is not None else "")
                + f"; its last output: {app.get('output') or 'none'}",
                highlight=False,
                markup=False,
            )


def cmd_ls(args: argparse.Namespace) -> int:
    from testbed.cluster.cluster import INVENTORY

    table = Table("name", "topology", "mode", "nodes", "pods", "created", title="testbeds")
    for manifest in list_runs(args.root):
        inv_path = manifest.state_file(INVENTORY)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.path.stat().st_ctime))
        if inv_path.exists():
            inv = json.loads(inv_path.read_text())
            table.add_row(
                manifest.run,
                inv["topology"],
                inv["facts"].get("mode", "?"),
                str(len(inv["nodes"])),
                str(len(inv["pods"])),
                created,
            )
        else:
            table.add_row(manifest.run, "?", "?", "?", "?", f"{created} (incomplete)")
    console.print(table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from testbed.cluster.cluster import load_inventory
    from testbed.inventory import inventory_tables, summary_line

    inv = _inventory(args.name, args.root, load_inventory)
    if args.json:
        print(json.dumps(inv, indent=2))
        return 0
    console.print(summary_line(inv))
    for _, table in inventory_tables(inv):
        console.print(table)
    _warn_stopped_apps(inv)
    return 0


def _inventory(
    name: str, root: Path, load: Callable[[str, Path], dict[str, Any]]
) -> dict[str, Any]:
    try:
        return load(name, root)
    except NetlabError as exc:
        raise UsageError(str(exc)) from None


def cmd_exec(args: argparse.Namespace) -> NoReturn:
    from testbed.cluster.cluster import in_pod, load_inventory
    from testbed.netlab.nsutil import netns_path
    from testbed.netlab.process import nsenter_argv

    inv = _inventory(args.name, args.root, load_inventory)
    pods = {p["name"]: p for p in inv["pods"]}
    if args.pod not in pods:
        raise UsageError(f"testbed {args.name} has no pod {args.pod!r}; pods: {', '.join(pods)}")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("exec needs a command after the pod name (testbed exec NAME POD -- CMD)")
    resolved = [pods[w]["ip"] if w in pods else w for w in command]
    argv = nsenter_argv(
        netns_path(pods[args.pod]["netns"]), in_pod(pods[args.pod]["netns"], resolved)
    )
    os.execvp(argv[0], argv)


def _print_report(report: Any) -> int:
    console.print(f"{report.run}: removed {len(report.removed)} resources")
    for error in report.errors:
        err_console.print(f"  could not remove {error}")
    return 1 if report.errors else 0


def cmd_down(args: argparse.Namespace) -> int:
    from testbed.netlab import RunManifest, clean_run

    return _print_report(clean_run(RunManifest.open(args.name, args.root)))


def cmd_clean(args: argparse.Namespace) -> int:
    from testbed.netlab import RunManifest, clean_all, clean_run

    if args.all == bool(args.name):
        raise UsageError("clean takes either a testbed NAME or --all")
    reports = (
        clean_all(args.root) if args.all else [clean_run(RunManifest.open(args.name, args.root))]
    )
    if not reports:
        console.print("nothing to clean")
    return max((_print_report(r) for r in reports), default=0)


# -- trace ----------------------------------------------------------------------------------
def cmd_trace(args: argparse.Namespace) -> int:
    from testbed.cluster.cluster import load_inventory
    from testbed.trace import TraceError, trace
    from testbed.trace.diagram import DiagramError

    inv = _inventory(args.name, args.root, load_inventory)
    if args.diagram and args.diagram.suffix.lower() not in (".svg", ".png"):
        raise UsageError(f"--diagram {args.diagram}: expected a .svg or .png file name")
    try:
        result = trace(inv, args.src, args.dst)
        if args.diagram:
            result.write_diagram(args.diagram)
    except (TraceError, DiagramError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(result.json())
    else:
        print(result.text(evidence=args.evidence))
        if args.diagram:
            print(f"diagram: {args.diagram}")
    return 0 if result.outcome.ok else 1


# -- experiments ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from testbed.experiment import run_experiment

    run_dir = run_experiment(args.spec, results_dir=args.results, report=args.report)
    console.print(f"results: {run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from testbed.experiment import write_report

    run_dir = args.run or _latest_run(args.results)
    console.print(f"report: {write_report(run_dir)}")
    return 0


def _latest_run(results: Path) -> Path:
    runs = sorted(p for p in results.glob("*") if (p / "results.csv").exists())
    if not runs:
        raise UsageError(f"no runs with results.csv under {results}; name one: testbed report RUN")
    return runs[-1]


def cmd_compare(args: argparse.Namespace) -> int:
    from testbed.experiment import compare_runs

    for run in (args.run_a, args.run_b):
        if not (run / "results.csv").exists():
            raise UsageError(f"{run}: not a results directory (no results.csv)")
    console.print(compare_runs(args.run_a, args.run_b))
    return 0


def cmd_export_results(args: argparse.Namespace) -> int:
    from testbed.experiment.export import export_run

    written = export_run(args.run, args.format, args.out)
    console.print(f"{len(written)} {args.format} file(s) under {written[0].parent}")
    return 0


# -- Kubernetes: export, export-experiment, import, apply, delete (testbed.kube) -------------
def _kube_errors() -> tuple[type[Exception], ...]:
    from testbed.kube.documents import DocumentError
    from testbed.kube.export import ExportError
    from testbed.kube.importer import RowsError
    from testbed.kube.istio import ApplyError

    return (DocumentError, ExportError, RowsError, ApplyError)


def cmd_kube(args: argparse.Namespace) -> int:
    try:
        code: int = args.kube_func(args)
        return code
    except _kube_errors() as exc:
        raise UsageError(str(exc)) from None


def _kube_export(args: argparse.Namespace) -> int:
    from testbed.cluster.loader import load_topology
    from testbed.cluster.model import plan
    from testbed.kube.export import parse_node_map, write_export

    topology = plan(load_topology(args.topology))
    node_map = parse_node_map(args.node_map, topology)
    files = write_export(topology, args.out, mode=args.mode, node_map=node_map, image=args.image)
    console.print(f"wrote {len(files)} files to {args.out} (kubectl apply -k {args.out})")
    return 0


def _kube_export_experiment(args: argparse.Namespace) -> int:
    from testbed.cluster.loader import load_topology
    from testbed.cluster.model import plan
    from testbed.experiment.spec import load_spec
    from testbed.kube.export import parse_node_map
    from testbed.kube.jobs import write_experiment
    from testbed.redirect import available_modes

    spec = load_spec(args.spec, available_modes=available_modes)
    node_map = parse_node_map(args.node_map, plan(load_topology(spec.topology.as_argument())))
    files = write_experiment(
        args.spec, args.out, mode=args.mode, node_map=node_map, image=args.image
    )
    console.print(f"wrote {len(files)} files to {args.out}; see {args.out / 'README.md'}")
    return 0


def _kube_import(args: argparse.Namespace) -> int:
    from testbed.kube.importer import import_rows

    console.print(f"results: {import_rows(args.rows, args.name, args.results)}")
    return 0


def _kube_apply(args: argparse.Namespace) -> int:
    from testbed.kube.live import apply_to_run, delete_from_run

    change = delete_from_run if args.delete else apply_to_run
    for res in change(args.name, args.file, args.root):
        verb = "deleted" if args.delete else "applied"
        console.print(
            f"{res.kind} {res.metadata.namespace or 'default'}/{res.metadata.name} {verb}"
        )
    return 0


def add_kube_commands(sub: Any) -> None:
    from testbed.kube.export import DEFAULT_IMAGE, EXPORT_MODES

    p = sub.add_parser("export", help="Kubernetes + Istio manifests for a topology")
    p.add_argument("topology", help="name, spec string or file.py, as for up")
    p.add_argument("--out", type=Path, required=True, help="folder for the manifests")
    p.add_argument("--node-map", help="node1=worker-a,node2=worker-b (default: same names)")
    p.add_argument("--mode", choices=EXPORT_MODES, default="ambient")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="image of the apps (the project's)")
    p.set_defaults(func=cmd_kube, kube_func=_kube_export)

    p = sub.add_parser("export-experiment", help="an experiment spec as Kubernetes Jobs")
    p.add_argument("spec", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--node-map", help="node1=worker-a,node2=worker-b (default: same names)")
    p.add_argument("--mode", choices=["ambient", "sidecar", "none"], default="ambient")
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.set_defaults(func=cmd_kube, kube_func=_kube_export_experiment)

    p = sub.add_parser("import", help="a Job's JSON rows as a results directory")
    p.add_argument("rows", type=Path)
    p.add_argument("--name", required=True, help="name of the results directory")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.set_defaults(func=cmd_kube, kube_func=_kube_import)

    for verb in ("apply", "delete"):
        p = sub.add_parser(verb, help=f"{verb} Istio YAML (policies, waypoints, routes, labels)")
        p.add_argument("name", help="a running testbed")
        p.add_argument("file", type=Path)
        p.set_defaults(func=cmd_kube, kube_func=_kube_apply, delete=verb == "delete")


def cmd_bench(args: argparse.Namespace) -> int:
    from testbed.bench import QUICK, BenchOptions, Durations, run_bench

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    options = BenchOptions(
        modes=modes,
        reps=args.reps if args.reps is not None else (2 if args.quick else 5),
        durations=QUICK if args.quick else Durations(),
        pinning=args.pinning,
        native=not args.no_native,
        out=args.out,
        root=args.root,
    )
    run_bench(options, say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from testbed.soak import SoakOptions, parse_duration, run_soak

    options = SoakOptions(
        duration=parse_duration(args.duration), mode=args.mode, interval=args.interval,
        http_qps=args.qps, out=args.out, name=args.name, root=args.root,
    )  # fmt: skip
    result = run_soak(options, say=lambda s: console.print(s, highlight=False, soft_wrap=True))
    return 1 if result.leaks else 0


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from testbed.redirect import available_modes

    modes = available_modes()
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Network emulation testbed for Istio's ambient data plane.",
    )
    parser.add_argument("--root", type=Path, default=RUNS_ROOT, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="kernel features and tools, and what needs them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("up", help="build a testbed and open a shell (or --detach)")
    p.add_argument("topology", help="name, spec string (multi_node,nodes=3,pods=10) or file.py")
    p.add_argument(
        "--mode", default="none", help=f"redirection mode: {', '.join(modes)} (default: none)"
    )
    p.add_argument(
        "--inpod-variant",
        metavar="VARIANT",
        help="rules used by mode inpod: the option inpod_variant (default redirect)",
    )
    p.add_argument(
        "-o", "--option", action="append", metavar="KEY=VALUE", help="a mode option, repeatable"
    )
    p.add_argument("--name", help="testbed name (default: random)")
    p.add_argument("--detach", action="store_true", help="leave it running and return")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("ls", help="running testbeds")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "inspect", help="nodes, pods, services and apps (running, or exited with code and output)"
    )
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("exec", help="run a command in a pod: exec NAME POD -- CMD...")
    p.add_argument("name")
    p.add_argument("pod")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("down", help="tear a testbed down")
    p.add_argument("name")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("clean", help="remove what a testbed's manifest names (NAME or --all)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser(
        "trace", help="walk one TCP connection through the data plane: trace NAME SRC DST[:PORT]"
    )
    p.add_argument("name", help="a running testbed")
    p.add_argument("src", help="source pod")
    p.add_argument("dst", help="pod, service name or VIP, with :PORT (default 8080 / first port)")
    p.add_argument("--json", action="store_true", help="the hops as JSON")
    p.add_argument("--evidence", action="store_true", help="print each hop's evidence too")
    p.add_argument("--diagram", type=Path, metavar="FILE", help="also draw it (.svg or .png)")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("run", help="run an experiment spec (YAML)")
    p.add_argument("spec", type=Path)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--report", action="store_true", help="write the report afterwards")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write report.md and plots for a run")
    p.add_argument("run", type=Path, nargs="?", help="results directory (default: latest)")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="what changed between two runs beyond noise")
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export-results", help="a run's HTTP cases as fortio JSON or SMP documents")
    p.add_argument("run", type=Path, help="results directory")
    p.add_argument("--format", choices=["fortio", "smp"], required=True)
    p.add_argument("--out", type=Path, help="folder to write (default: RUN/export/FORMAT)")
    p.set_defaults(func=cmd_export_results)
    add_kube_commands(sub)

    p = sub.add_parser("bench", help="none vs modes vs a native mTLS proxy, in one sitting")
    p.add_argument(
        "--modes",
        default="inpod",
        help="comma-separated modes (default: inpod); inpod+istio-ztunnel: inpod with Istio's "
        "ztunnel, the binary named by TESTBED_ZTUNNEL",
    )
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 5; quick: 2)")
    p.add_argument("--quick", action="store_true", help="1 s per figure: under 2 minutes")
    p.add_argument("--pinning", choices=["none", "split"], default="none",
                   help="split: client and server apps each on its own CPU")  # fmt: skip
    p.add_argument("--no-native", action="store_true", help="skip the HAProxy native peer")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="rows.csv and summary")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("soak", help="mixed traffic and policy changes for a while; fail on leaks")
    p.add_argument("--duration", default="10m", help="600, 600s, 10m, 1h (default 10m)")
    p.add_argument("--mode", default="inpod", help=f"one of {', '.join(modes)} (default inpod)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--qps", type=int, default=50, help="HTTP requests/s through the waypoint")
    p.add_argument("--name", default="soak", help="the testbed's name (default soak)")
    p.add_argument("--out", type=Path, default=Path("results/soak"), help="results folder")
    p.set_defaults(func=cmd_soak)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt.install()  # SIGTERM tears down like Ctrl-C; neither can be lost
    try:
        code: int = args.func(args)
        return code
    except TestbedError as exc:  # every error of ours: one line, never a traceback
        err_console.print(f"testbed: error: {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:
        err_console.print("testbed: interrupted; everything it created was removed")
        partial = getattr(exc, "run_dir", None)  # an experiment keeps what it measured
        if partial is not None:
            err_console.print(f"partial results: {partial}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
