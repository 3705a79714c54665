"""`python -m testbed.mesh.waypoint --mesh-config FILE --l7-config FILE --certs DIR`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from testbed.mesh.proxy import shell
from testbed.mesh.waypoint.app import Settings, Waypoint


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m testbed.mesh.waypoint", description=__doc__)
    parser.add_argument("--mesh-config", type=Path, required=True, help="mesh config (YAML)")
    parser.add_argument("--l7-config", type=Path, required=True, help="routes and L7 policies")
    parser.add_argument(
        "--certs",
        type=Path,
        required=True,
        help="folder with cert-chain.pem, key.pem, root-cert.pem",
    )
    parser.add_argument("--bind", default="0.0.0.0", help="address of HBONE, metrics, ready")
    parser.add_argument("--name", default="waypoint", help="shown in log lines")
    return parser


def make(args: argparse.Namespace) -> Waypoint:
    return Waypoint(Settings(args.mesh_config, args.l7_config, args.certs, args.bind))


if __name__ == "__main__":
    shell.main(parser(), sys.argv[1:], make, lambda args: str(args.name))
