"""Link shaping with tc: rate with tbf, delay and loss with netem (where the kernel has it)."""

from __future__ import annotations

from testbed.netlab.netns import Netns
from testbed.netlab.process import NetlabError


def shape_link(
    ns: Netns,
    ifname: str,
    *,
    rate: str | None = None,
    delay: str | None = None,
    loss: float | None = None,
    netem_available: bool = True,
) -> list[str]:
    """Install the qdiscs; returns the tc commands used (for the inventory)."""
    commands: list[list[str]] = []
    parent = ["root"]
    if delay is not None or loss is not None:
        if not netem_available:
            raise NetlabError(
                f"delay/loss on {ns.name}/{ifname} need the netem qdisc, which this kernel "
                "lacks (see 'testbed doctor'); remove delay/loss or use another kernel"
            )
        netem = ["netem"]
        if delay is not None:
            netem += ["delay", delay]
        if loss is not None:
            netem += ["loss", f"{loss}%"]
        commands.append(["tc", "qdisc", "add", "dev", ifname, "root", "handle", "1:", *netem])
        parent = ["parent", "1:"]
    if rate is not None:
        commands.append(
            [
                "tc",
                "qdisc",
                "add",
                "dev",
                ifname,
                *parent,
                "handle",
                "10:",
                "tbf",
                "rate",
                rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            ]
        )
    for argv in commands:
        ns.run(argv)
    return [" ".join(c) for c in commands]
