"""The process shell every proxy of the mesh runs in (ztunnel in its three shapes, the
waypoint, the sidecar): command line, logging, signal handling, config files watched for
changes, and the HTTP endpoints Istio's proxies serve.

    15000 admin (/config_dump, /connections), bound to 127.0.0.1 as Istio binds it: read it
          from inside the proxy's network namespace (`testbed exec`, the shell)
    15020 metrics (/metrics, /stats/prometheus), all addresses
    15021 readiness (/healthz/ready), all addresses

Modules: http (the small HTTP/1.1 server), connections (the connection records served on
/connections), watch (config reload), telemetry (traffic labels), shell (ProxyProcess and
`main`).
"""

ADMIN_PORT = 15000
METRICS_PORT = 15020
READY_PORT = 15021
ADMIN_HOST = "127.0.0.1"  # Istio's proxies keep admin on localhost
PUBLIC_HOST = "0.0.0.0"
