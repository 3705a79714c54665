"""`python -m testbed.mesh.ztunnel --config FILE --certs DIR --zds-socket PATH --node NAME`"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from testbed.mesh.ztunnel.app import Settings, Ztunnel


def parse_args(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m testbed.mesh.ztunnel", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="mesh config (local YAML)")
    parser.add_argument("--certs", type=Path, required=True, help="workload certificate folder")
    parser.add_argument("--zds-socket", required=True, help="the node agent's ZDS socket")
    parser.add_argument("--node", required=True, help="the node this ztunnel serves")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s ztunnel-{args.node} %(levelname)s %(name)s: %(message)s",
    )
    return Settings(args.config, args.certs, args.zds_socket, args.node)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    uvloop.run(Ztunnel(settings).run())


if __name__ == "__main__":
    main()
