"""ztunnel: the per-node L4 proxy of Istio's ambient mesh (docs/architecture.md), inpod mode.

One process per node, in its own pod namespace. The node's CNI agent hands it each enrolled
pod's netns over ZDS; for each pod it opens 15001 (outbound capture), 15006 (plaintext
inbound) and 15008 (HBONE inbound) inside that pod's namespace. Its own namespace carries
the proxy shell's endpoints (testbed.mesh.proxy): 15000 (admin, /config_dump, /connections;
localhost only), 15020 (/metrics) and 15021 (/healthz/ready).

    python -m testbed.mesh.ztunnel --config mesh.yaml --certs DIR --zds-socket PATH --node N
"""

from testbed.mesh.proxy import ADMIN_PORT, METRICS_PORT, READY_PORT

__all__ = [
    "ADMIN_PORT",
    "HBONE_PORT",
    "INBOUND_PLAINTEXT_PORT",
    "METRICS_PORT",
    "OUTBOUND_PORT",
    "READY_PORT",
    "ZTUNNEL_PORTS",
]

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
# A connection addressed to one of ztunnel's own in-pod ports is refused (it would loop).
ZTUNNEL_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT})
