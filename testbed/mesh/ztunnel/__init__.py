"""ztunnel: the per-node L4 proxy of Istio's ambient mesh (DESIGN.md section 5), inpod mode.

One process per node, in its own pod namespace. The node's CNI agent hands it each enrolled
pod's netns over ZDS; for each pod it opens 15001 (outbound capture), 15006 (plaintext
inbound) and 15008 (HBONE inbound) inside that pod's namespace. Its own namespace carries
15000 (admin, /config_dump), 15020 (/metrics) and 15021 (/healthz/ready).

    python -m testbed.mesh.ztunnel --config mesh.yaml --certs DIR --zds-socket PATH --node N
"""

ADMIN_PORT = 15000
METRICS_PORT = 15020
READY_PORT = 15021
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
# A connection addressed to one of ztunnel's own in-pod ports is refused (it would loop).
ZTUNNEL_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT})
