"""Rendering a testbed's inventory (nodes, pods, services) as rich tables."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def inventory_tables(inv: dict[str, Any]) -> list[tuple[str, Table]]:
    nodes = Table("node", "netns", "underlay", "pod CIDR", "link", title="nodes")
    for node in inv["nodes"]:
        link = ", ".join(f"{k}={v}" for k, v in node["link"].items() if v is not None)
        nodes.add_row(
            node["name"], node["netns"], node["underlay_ip"], node["pod_cidr"], link or "-"
        )
    pods = Table("pod", "node", "namespace", "service account", "IP", "labels", title="pods")
    for pod in inv["pods"]:
        labels = ",".join(f"{k}={v}" for k, v in pod["labels"].items())
        name = pod["name"] + (" (system)" if pod.get("system") else "")
        pods.add_row(name, pod["node"], pod["namespace"], pod["service_account"], pod["ip"], labels)
    services = Table("service", "namespace", "VIP", "ports", "endpoints", title="services")
    for svc in inv["services"]:
        ports = ",".join(f"{p}->{t}" for p, t in svc["ports"].items())
        services.add_row(
            svc["name"], svc["namespace"], svc["vip"], ports, ", ".join(svc["endpoints"])
        )
    tables = [("nodes", nodes), ("pods", pods), ("services", services)]
    if inv.get("apps"):
        tables.append(("apps", apps_table(inv["apps"])))
    return tables


def apps_table(apps: list[dict[str, Any]]) -> Table:
    """Declared apps with their state; an exited one with its code and last output lines."""
    table = Table("pod", "app", "port", "pid", "state", "command / last output", title="apps")
    for app in apps:
        state = app["state"]
        if state == "exited":
            state = f"[red]exited {app.get('exit_code')}[/red]"
        elif state == "gone":
            state = "[red]gone (no exit status)[/red]"
        detail = app["command"] if app["state"] == "running" else app.get("output") or "-"
        port = "-" if app["port"] is None else str(app["port"])
        table.add_row(app["pod"], app["app"], port, str(app["pid"]), state, detail)
    return table


def summary_line(inv: dict[str, Any]) -> str:
    facts = ", ".join(f"{k}={v}" for k, v in inv["facts"].items())
    return (
        f"testbed {inv['run']}: topology {inv['topology']}, {len(inv['nodes'])} nodes, "
        f"{sum(1 for p in inv['pods'] if not p.get('system'))} pods, {facts}"
    )
