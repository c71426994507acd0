"""deploy/grafana/hive-relay.json: the rules Grafana enforces when a dashboard is
imported, and every series it asks for exists in a real relay's /metrics.

The metric check is by selector: each `hive_relay_…{…}` in every expression must
name a sample the relay exports, and each label matcher (other than the
`instance` and `job` labels Prometheus adds) must match a label value of that
sample, so a renamed metric, label or route template fails here, not on an
operator's empty panel.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import TestCA
from tests.redisproc import RedisServer
from tests.relayproc import REPO, RelayProcess

DASHBOARD = REPO / "deploy" / "grafana" / "hive-relay.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms"}
ADDED_BY_PROMETHEUS = {"instance", "job"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


# ------------------------------------------------------------ import rules


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["title"], str) and dashboard["title"].strip()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert isinstance(dashboard["version"], int)
    assert "id" not in dashboard or dashboard["id"] is None  # an import assigns it
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert set(dashboard["time"]) == {"from", "to"}


def test_panels_have_unique_ids_and_fit_the_grid(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["title"].strip()
        grid = panel["gridPos"]
        assert set(grid) == {"x", "y", "w", "h"}
        assert all(isinstance(v, int) for v in grid.values())
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] >= 1 and grid["h"] >= 1
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['id']} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]


def test_every_query_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    queried = 0
    for panel in panels(dashboard):
        if panel["type"] in ("row", "text"):
            assert not panel.get("targets")
            continue
        queried += 1
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert isinstance(target["expr"], str) and target["expr"].strip()
    assert queried >= 10


def test_variables_are_defined_and_used(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert len(variables) == len(dashboard["templating"]["list"])
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["datasource"] == DATASOURCE
    assert instance["multi"] and instance["includeAll"]
    assert "hive_relay_uptime_seconds" in instance["query"]["query"]
    text = json.dumps(dashboard)
    used = set(re.findall(r"\$\{?(\w+)", text))
    assert used - GRAFANA_VARIABLES <= set(variables), used - set(variables)
    for _, target in targets(dashboard):
        if "hive_relay_" in target["expr"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_the_figures_issue_17_asks_for_are_there(dashboard: dict[str, Any]) -> None:
    titles = {p["title"] for p in panels(dashboard)}
    for title in (
        "Appends / s",
        "Reads / s",
        "Live streams",
        "Stored bytes vs budget",
        "4xx / 5xx per second",
        "Publish p99",
        "Journal fsync p99",
    ):
        assert title in titles


# ------------------------------------------------------------ against /metrics


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, operator, value)]) for each hive_relay_ selector in `expr`."""
    for m in re.finditer(r"\b(hive_relay_[a-z0-9_]+)", expr):
        name, at = m.group(1), m.end()
        matchers: list[tuple[str, str, str]] = []
        if expr[at : at + 1] == "{":
            end, quoted = at + 1, False
            while quoted or expr[end] != "}":  # a `}` inside a quoted value does not end it
                if expr[end] == "\\":
                    end += 1
                elif expr[end] == '"':
                    quoted = not quoted
                end += 1
            body = expr[at + 1 : end]
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body):
                matchers.append((label, op, value))
        yield name, matchers


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    """Sample name → the label sets a relay with a journal, direct TLS and a watched
    allowlist file exports, after a little traffic of every kind the dashboard draws
    (a 429 and a 503 too)."""
    tmp: Path = tmp_path_factory.mktemp("grafana")
    ca = TestCA()
    ca.issue("dashboard").write(tmp / "cert.pem", tmp / "key.pem")
    (tmp / "tokens").write_text("dashboard-token\n")
    env = {
        "HIVE_RELAY_ACCESS_TOKENS_FILE": str(tmp / "tokens"),
        "HIVE_RELAY_DATA_DIR": str(tmp / "data"),
        "HIVE_RELAY_TLS_CERT": str(tmp / "cert.pem"),
        "HIVE_RELAY_TLS_KEY": str(tmp / "key.pem"),
        "HIVE_RELAY_PUSH_RATE": "1",
        "HIVE_RELAY_PUSH_BURST": "2",
        "HIVE_RELAY_MAX_SSE": "1",
    }
    with (
        RelayProcess(env=env, verify=ca.client_context()) as relay,
        httpx.Client(
            base_url=relay.url,
            verify=ca.client_context(),
            timeout=10,
            headers={"authorization": "Bearer dashboard-token"},
        ) as c,
    ):
        for n in range(4):  # the third and fourth are rate limited (429)
            c.post("/v1/workspaces/dash/envelopes", json={"n": n})
        c.post("/v1/workspaces/dash/envelopes", json={"n": 0}, headers={"Idempotency-Key": "k"})
        c.get("/v1/workspaces/dash/envelopes")
        c.get("/no/such/route")
        with c.stream("GET", "/v1/workspaces/dash/events") as held:  # the one stream allowed
            assert held.status_code == 200
            assert c.get("/v1/workspaces/dash/events").status_code == 503  # a 5xx
        text = c.get("/metrics").text
    # The Redis-only families (the status sampler's PING) from a relay on a private
    # redis-server, once it has sampled.
    with (
        RedisServer() as server,
        RelayProcess(
            env={"HIVE_RELAY_STORE": server.url, "HIVE_RELAY_STATUS_SAMPLE_SECS": "1"}
        ) as on_redis,
    ):
        deadline = time.monotonic() + 20
        while True:
            redis_text = httpx.get(on_redis.url + "/metrics", timeout=5).text
            if re.search(r"^hive_relay_redis_ping_seconds_count [1-9]", redis_text, re.M):
                break
            assert time.monotonic() < deadline, "the status sampler never PINGed Redis"
            time.sleep(0.2)
    samples: dict[str, list[dict[str, str]]] = {}
    for family in [
        *text_string_to_metric_families(text),
        *text_string_to_metric_families(redis_text),
    ]:
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def test_every_selector_names_an_exported_series(
    dashboard: dict[str, Any], exported: dict[str, list[dict[str, str]]]
) -> None:
    checked = 0
    for panel, target in targets(dashboard):
        for name, matchers in selectors(target["expr"]):
            where = f"{panel['title']!r}: {name}"
            assert name in exported, f"{where} is not in /metrics"
            label_sets = exported[name]
            for label, op, value in matchers:
                if label in ADDED_BY_PROMETHEUS:
                    continue
                values = {labels[label] for labels in label_sets if label in labels}
                assert values, f"{where} has no label {label!r}"
                if op == "=":
                    assert value in values, f"{where}: {label}={value!r} not among {values}"
                elif op == "=~":
                    pattern = re.compile(value.encode().decode("unicode_escape"))
                    assert any(pattern.fullmatch(v) for v in values), (
                        f"{where}: {label}=~{value!r} matches none of {values}"
                    )
            checked += 1
    assert checked >= 20


def test_every_metric_the_alert_rules_name_is_exported_with_journal_and_tls(
    exported: dict[str, list[dict[str, str]]],
) -> None:
    """The alert rules too, on the relay that has every optional family on."""
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name, _ in selectors(rule["expr"]):
                assert name in exported, f"{rule['alert']}: {name} is not in /metrics"
