"""`python -m testbed.mesh.waypoint --mesh-config FILE --l7-config FILE --certs DIR`"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path

import uvloop

from testbed.mesh.waypoint.app import Settings, Waypoint


def parse_args(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m testbed.mesh.waypoint", description=__doc__)
    parser.add_argument("--mesh-config", type=Path, required=True, help="mesh config (YAML)")
    parser.add_argument("--l7-config", type=Path, required=True, help="routes and L7 policies")
    parser.add_argument(
        "--certs",
        type=Path,
        required=True,
        help="folder with cert-chain.pem, key.pem, root-cert.pem",
    )
    parser.add_argument("--bind", default="0.0.0.0", help="address of all three listeners")
    parser.add_argument("--name", default="waypoint", help="shown in log lines")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s",
    )
    return Settings(args.mesh_config, args.l7_config, args.certs, args.bind)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(Waypoint(settings).run())


if __name__ == "__main__":
    main()
