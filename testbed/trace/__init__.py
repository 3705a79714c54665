"""`testbed trace`: the live walk of one TCP connection through a testbed's data plane.

    from testbed.trace import trace
    result = trace(cluster, "client", "server2:8080")   # a running Cluster
    print(result.text()); result.hops; result.write_diagram("walk.svg")

`trace` takes a running Cluster or the inventory of a detached testbed (what the CLI and
the shell use). It opens one connection, sends a few bytes each way, closes it, and joins
the evidence that connection left in every namespace on its path into one ordered walk.
The cluster layer does not import this package (imports point down), so the Python entry
point is this function rather than a Cluster method.
"""

from testbed.trace.features import detect_tracing
from testbed.trace.run import TraceError, TraceResult, trace
from testbed.trace.walk import Hop

__all__ = ["Hop", "TraceError", "TraceResult", "detect_tracing", "trace"]
