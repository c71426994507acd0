"""deploy/prometheus/ against the real tools: promtool checks the config and the
rules and runs their unit tests, and a real Prometheus scrapes a running relay.

The scrape test runs the project's prometheus.yml and alerts.yml with only the
target (a fresh relay on a free port) and the intervals (1 s) changed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from e2e_helpers import DEPLOY, wait_for

from tests.conftest import require_tool
from tests.relayproc import RelayProcess, free_port, relay_env
from tests.support import make_client

pytestmark = [pytest.mark.e2e]

PROM = DEPLOY / "prometheus"
# Exported only where the feature is on (the journal's fsync histogram, direct
# TLS): the rules may name them before this relay does; every other name must
# exist. tests/test_grafana_dashboard.py checks them on a relay with both on.
OPTIONAL = {
    "hive_relay_journal_fsync_seconds",
    "hive_relay_tls_cert_not_after_seconds",
    "hive_relay_tls_reload",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool")
    return subprocess.run(
        [tool, *args], cwd=PROM, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_config_and_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout


def test_promtool_rule_unit_tests_cover_every_alert() -> None:
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    tested = {
        case["alertname"]
        for t in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
        for case in t.get("alert_rule_test", [])
        # An alert counts as covered only where some case expects it to fire.
        if case.get("exp_alerts")
    }
    assert alerts and alerts <= tested, f"alerts no case fires: {sorted(alerts - tested)}"


def _families(exposition: str) -> set[str]:
    names = re.findall(r"^# TYPE (\S+) ", exposition, re.M)
    return {re.sub(r"_total$", "", n) for n in names}


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(hive_relay_[a-z_]+)", expr))
    return {re.sub(r"(_total|_bucket|_sum|_count)$", "", n) for n in names}


def test_every_metric_the_rules_name_is_exported() -> None:
    with make_client() as client:
        families = _families(client.get("/metrics").text)
    named: set[str] = set()
    for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for r in g["rules"]:
            named |= _metric_names(r["expr"])
    assert named
    missing = named - families - OPTIONAL
    assert not missing, f"rules name metrics /metrics lacks: {sorted(missing)}"


@pytest.fixture()
def relay() -> Iterator[RelayProcess]:
    with RelayProcess() as proc:
        yield proc


@pytest.mark.slow
def test_real_prometheus_scrapes_the_relay(relay: RelayProcess, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{relay.port}"]}]
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=relay_env(),
            start_new_session=True,
        )
        try:

            def series() -> list[dict[str, object]] | None:
                try:
                    r = httpx.get(f"{api}/query", params={"query": "hive_relay_uptime_seconds"})
                except httpx.HTTPError:
                    return None
                return r.json()["data"]["result"] if r.status_code == 200 else None

            found = wait_for(series, 60, "Prometheus to scrape the relay", every=0.5)
            labels = found[0]["metric"]
            assert isinstance(labels, dict)
            assert labels["job"] == "hive-relay"
            assert labels["instance"] == f"127.0.0.1:{relay.port}"
            up = httpx.get(f"{api}/query", params={"query": "up"}).json()["data"]["result"]
            assert [s["value"][1] for s in up] == ["1"]
            names = httpx.get(f"{api}/label/__name__/values").json()["data"]
            for name in (
                "hive_relay_http_requests_total",
                "hive_relay_budget_limit_bytes",
                "hive_relay_live_streams_limit",
                "hive_relay_envelopes_appended_total",
            ):
                assert name in names, name
            rules = httpx.get(f"{api}/rules").json()["data"]["groups"]
            assert sum(len(g["rules"]) for g in rules) == 10

            # Every expression of the Grafana dashboard is PromQL this Prometheus
            # accepts, with the dashboard's variables as Grafana would fill them in.
            dashboard = json.loads((DEPLOY / "grafana" / "hive-relay.json").read_text())
            results: dict[str, list[object]] = {}
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"].replace("$instance", ".*")
                    expr = expr.replace("$__rate_interval", "1m")
                    r = httpx.get(f"{api}/query", params={"query": expr})
                    assert r.status_code == 200, (panel["title"], expr, r.text)
                    assert r.json()["status"] == "success", (panel["title"], r.text)
                    results[panel["title"]] = r.json()["data"]["result"]
            for title in ("Uptime", "Live streams", "Stored bytes vs budget"):
                assert results[title], f"the panel {title!r} shows nothing"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
