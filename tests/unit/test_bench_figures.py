"""The bench's statistics, table and tidy rows (pure)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from testbed.bench import BenchError, BenchOptions
from testbed.bench.figures import (
    Sample,
    Spread,
    expected_figures,
    missing_figures,
    spreads,
    table,
    write_rows,
    write_summary,
)
from testbed.bench.native import TLS_PORT_OFFSET, client_config, server_config


def samples_for(arm: str, values: list[float]) -> list[Sample]:
    return [Sample(rep, arm, "throughput", v) for rep, v in enumerate(values, 1)]


def test_spread_median_range_and_cv() -> None:
    spread = Spread.of([9.0, 10.0, 11.0])
    assert (spread.median, spread.low, spread.high) == (10.0, 9.0, 11.0)
    assert spread.cv == pytest.approx(0.1)
    assert Spread.of([5.0]).cv == 0.0


def test_table_gives_ratios_to_none_and_to_the_native_peer() -> None:
    got = (
        samples_for("none", [10, 10]) + samples_for("inpod", [4, 4]) + samples_for("native", [2, 2])
    )
    text = table(got, ["none", "inpod", "native"], "native")
    (inpod,) = [line for line in text.splitlines() if " inpod " in line]
    assert "0.400x" in inpod and "2.000x" in inpod
    assert spreads(got)[("inpod", "throughput")].median == 4


def test_missing_figures_names_each_gap_and_none_has_no_proxy_figures() -> None:
    assert "proxy_rss" not in expected_figures("none")
    assert "proxy_rss" in expected_figures("inpod")
    gaps = missing_figures(samples_for("none", [1]), ["none"])
    assert ("none", "throughput") not in gaps and ("none", "rr_p50") in gaps


def test_rows_and_summary_are_tidy(tmp_path: Path) -> None:
    got = samples_for("none", [10, 12]) + samples_for("inpod", [4, 6])
    write_rows(tmp_path / "rows.csv", got, "split")
    rows = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert rows[0] == {
        "rep": "1", "arm": "none", "figure": "throughput", "value": "10", "unit": "Gbit/s",
        "pinning": "split",
    }  # fmt: skip
    write_summary(tmp_path / "summary.csv", got, None)
    summary = {r["arm"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert summary["inpod"]["ratio_none"] == "0.4545" and summary["inpod"]["ratio_native"] == ""


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (BenchOptions(reps=0), "--reps"),
        (BenchOptions(pinning="odd"), "--pinning"),
        (BenchOptions(modes=("none",)), "--modes"),
    ],
)
def test_bad_options_name_the_option(options: BenchOptions, named: str) -> None:
    with pytest.raises(BenchError, match=named):
        options.check()


def test_haproxy_configs_tunnel_each_app_port_over_mtls(tmp_path: Path) -> None:
    pem, root = tmp_path / "c.pem", tmp_path / "root.pem"
    client = client_config("10.0.1.1", "10.0.2.1", [5201, 8080], pem, root)
    server = server_config("10.0.2.1", "10.2.0.5", [5201, 8080], pem, root)
    assert "bind 10.0.1.1:8080" in client
    assert f"server peer 10.0.2.1:{8080 + TLS_PORT_OFFSET} ssl crt {pem}" in client
    assert (
        f"bind 10.0.2.1:{5201 + TLS_PORT_OFFSET} ssl crt {pem} ca-file {root} verify required"
        in server
    )
    assert "server app 10.2.0.5:5201" in server
    assert "nbthread 1" in client and "ssl-min-ver TLSv1.3" in server
