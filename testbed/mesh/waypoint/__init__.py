"""waypoint: the L7 proxy of Istio's ambient mesh (see docs/architecture.md).

A waypoint is a pod with its own identity. Source ztunnels send HBONE to its 15008 with the
original service VIP:port as the CONNECT target; it terminates HBONE, handles HTTP/1.1 (h11)
and HTTP/2 (h2) inside each tunnel (anything else passes as TCP under L4 policy), applies
L7 authorization, routing, faults, retries and timeouts, and sends each request over HBONE
to the chosen endpoint's `<pod ip>:15008`. It runs in the proxy shell (testbed.mesh.proxy):
15000 admin (/config_dump, /connections; localhost only), 15020 /metrics, 15021
/healthz/ready.

    python -m testbed.mesh.waypoint --mesh-config mesh.yaml --l7-config l7.yaml --certs DIR

Modules: routing and l7authz (pure policy), config (the L7 file), sniff, messages, http1,
http2, proxy (the per-request pipeline), upstream (HBONE to endpoints), telemetry, via
(waypoint resolution, for ztunnels too), app.
"""

from testbed.mesh.proxy import ADMIN_PORT, METRICS_PORT, READY_PORT

__all__ = ["ADMIN_PORT", "HBONE_PORT", "METRICS_PORT", "READY_PORT"]

HBONE_PORT = 15008
