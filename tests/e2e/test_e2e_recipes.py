"""The deployment recipes, checked by the tools that will read them.

systemd-analyze verifies the unit, hadolint lints the Dockerfile, Caddy adapts
the Caddyfile, tomllib and PyYAML read fly.toml, render.yaml and the compose
file, and the environment file example is fed to the relay itself.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from e2e_helpers import DEPLOY, REPO

from relay.settings import KNOBS, Settings
from tests.conftest import require_tool
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.e2e]

KNOB_ENVS = {k.env for k in KNOBS}
DEFAULTS = {k.env: k.default for k in KNOBS}


def _unit_lines(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit, repeated keys kept."""
    out = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active settings, commented-out settings) of deploy/hive-relay.env.example."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in (DEPLOY / "hive-relay.env.example").read_text().splitlines():
        m = re.fullmatch(r"(#?)(HIVE_RELAY_[A-Z0-9_]+)=(.*)", line.strip())
        if m:
            target = commented if m.group(1) else active
            assert m.group(2) not in active and m.group(2) not in commented, m.group(2)
            target[m.group(2)] = m.group(3)
    return active, commented


# ------------------------------------------------------------------ systemd
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    text = (DEPLOY / "hive-relay.service").read_text()
    shipped = "ExecStart=/opt/hive-relay/bin/python -m relay"
    assert text.count(shipped) == 1
    assert text.count("ExecReload=/opt/hive-relay/bin/python -m relay check-config") == 1
    # Point ExecStart and ExecReload at an interpreter that exists here; the rest as shipped.
    unit = tmp_path / "hive-relay.service"
    unit.write_text(text.replace("/opt/hive-relay/bin/python", sys.executable))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    complaints = [ln for ln in (done.stdout + done.stderr).splitlines() if "hive-relay" in ln]
    assert complaints == []

    # And systemd's own hardening score, computed offline from the file.
    sec = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for hive-relay\.service: ([\d.]+)", sec.stdout)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 2.0, sec.stdout


def test_systemd_unit_is_hardened_as_documented() -> None:
    lines = _unit_lines((DEPLOY / "hive-relay.service").read_text())
    service = {}
    for section, key, value in lines:
        if section == "Service":
            service.setdefault(key, []).append(value)
    must = {
        "User": "hive-relay",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/hive-relay",
        "Restart": "always",
        "EnvironmentFile": "/etc/hive-relay/hive-relay.env",
        "KillSignal": "SIGTERM",
    }
    for key, value in must.items():
        assert service.get(key) == [value], key
    env = dict(v.split("=", 1) for v in service["Environment"])
    assert env["HIVE_RELAY_DATA_DIR"] == "/var/lib/hive-relay"
    # The relay listens on loopback only and trusts exactly the proxy there.
    assert env["HIVE_RELAY_ADDR"] == "127.0.0.1:8443"
    assert env["HIVE_RELAY_TRUSTED_PROXIES"] == "127.0.0.1"
    # systemd must wait longer than the relay's own shutdown bound.
    assert int(service["TimeoutStopSec"][0]) > DEFAULTS["HIVE_RELAY_SHUTDOWN_TIMEOUT"]


# ---------------------------------------------------------------- env file
def test_env_example_lists_every_setting_with_its_default() -> None:
    active, commented = _env_example()
    assert set(active) | set(commented) == KNOB_ENVS
    for env, value in commented.items():
        default = DEFAULTS[env]
        if default is None or env == "HIVE_RELAY_MAX_BYTES":
            continue
        if isinstance(default, bool):
            assert value == ("true" if default else "false"), env
        else:
            assert value == ("" if default == "" else str(default)), env
    # Every value in the file, active or not, is one the relay accepts.
    values = {k: v for k, v in {**commented, **active}.items() if v}
    Settings.load([], values)


def test_env_example_starts_a_relay(tmp_path: Path) -> None:
    """The active settings of the example, as the unit would pass them."""
    active, _ = _env_example()
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per line\nexample-token\n")
    env = dict(active)
    env["HIVE_RELAY_DATA_DIR"] = str(tmp_path / "data")
    env["HIVE_RELAY_ACCESS_TOKENS_FILE"] = str(tokens)
    del env["HIVE_RELAY_ADDR"]  # RelayProcess picks a free loopback port
    with RelayProcess(env=env) as relay:
        assert httpx.get(relay.url + "/v1/health").text == "ok"
        r = httpx.get(relay.url + "/v1/workspaces/w/envelopes")
        assert r.status_code == 401
        r = httpx.get(
            relay.url + "/v1/workspaces/w/envelopes",
            headers={"Authorization": "Bearer example-token"},
        )
        assert r.status_code == 200
    assert (tmp_path / "data" / "relay.snapshot").exists()


# ------------------------------------------------------------------ Docker
def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return str(beside)
    return require_tool("hadolint")


def test_dockerfile_passes_hadolint_at_error_level() -> None:
    done = subprocess.run(
        [_hadolint(), "--failure-threshold", "error", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file() -> None:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    relay, redis, scaled = services["relay"], services["redis"], services["relay-redis"]
    # The relay alone: no profile, published on 8443, snapshots in a volume.
    assert "profiles" not in relay
    assert relay["ports"] == ["8443:8443"]
    assert relay["environment"]["HIVE_RELAY_DATA_DIR"] == "/data"
    assert any(v.endswith(":/data") for v in relay["volumes"])
    context = (DEPLOY / relay["build"]["context"]).resolve()
    assert (context / relay["build"]["dockerfile"]) == REPO / "Dockerfile"
    # The redis profile: Redis and relays that use it.
    assert redis["profiles"] == ["redis"] and scaled["profiles"] == ["redis"]
    assert scaled["environment"]["HIVE_RELAY_STORE"] == "redis://redis:6379/0"
    assert scaled["environment"]["HIVE_RELAY_DATA_DIR"] == ""
    assert scaled["depends_on"]["redis"]["condition"] == "service_healthy"
    assert scaled["build"] == relay["build"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    for service in (relay, scaled):
        assert set(service.get("environment", {})) <= KNOB_ENVS
        assert service["stop_grace_period"] == "20s"


def test_compose_redis_profile_environment_serves() -> None:
    """The relay-redis service's environment, with `redis:6379` a private Redis."""
    from tests.redisproc import RedisServer

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    env = dict(compose["services"]["relay-redis"]["environment"])
    with RedisServer() as redis:
        env["HIVE_RELAY_STORE"] = env["HIVE_RELAY_STORE"].replace(
            "redis://redis:6379", f"redis://127.0.0.1:{redis.port}"
        )
        # The image sets HIVE_RELAY_DATA_DIR=/data; the service empties it.
        env = {"HIVE_RELAY_DATA_DIR": "/data", **env}
        with RelayProcess(env=env) as relay:
            assert httpx.get(relay.url + "/v1/health").text == "ok"
            r = httpx.post(relay.url + "/v1/workspaces/compose/envelopes", json={"x": 1})
            assert r.status_code == 200
            assert "<th>Store</th><td>redis</td>" in httpx.get(relay.url + "/").text
            logs = relay.logs()
        assert "HIVE_RELAY_DATA_DIR is ignored" not in logs


# ------------------------------------------------------------------ Fly.io
def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert m, text
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_fly_toml() -> None:
    text = (REPO / "fly.toml").read_text()
    fly = tomllib.loads(text)
    http = fly["http_service"]
    assert http["internal_port"] == 8443
    assert http["force_https"] is True
    checks = http["checks"]
    assert len(checks) == 1
    assert checks[0]["path"] == "/v1/health" and checks[0]["method"] == "GET"
    assert _seconds(checks[0]["timeout"]) <= _seconds(checks[0]["interval"])
    mounts = fly["mounts"]
    assert len(mounts) == 1 and mounts[0]["destination"] == "/data"
    assert fly["env"]["HIVE_RELAY_DATA_DIR"] == "/data"
    assert set(fly["env"]) <= KNOB_ENVS
    assert fly["build"]["dockerfile"] == "Dockerfile" and (REPO / "Dockerfile").exists()
    # A graceful stop: SIGTERM, and time for the relay's own shutdown bound.
    assert fly["kill_signal"] == "SIGTERM"
    assert _seconds(fly["kill_timeout"]) > DEFAULTS["HIVE_RELAY_SHUTDOWN_TIMEOUT"]
    # Live streams: count connections; let the relay answer its own 503 first.
    assert http["concurrency"]["type"] == "connections"
    assert http["concurrency"]["hard_limit"] > DEFAULTS["HIVE_RELAY_MAX_SSE"]
    assert http["auto_stop_machines"] in ("off", False)
    assert http["min_machines_running"] >= 1
    # Scaling-out notes: Redis as the store.
    assert "HIVE_RELAY_STORE=redis://" in text and "docs/scaling.md" in text


# ------------------------------------------------------------------ Render
def test_render_yaml() -> None:
    render: dict[str, Any] = yaml.safe_load((REPO / "render.yaml").read_text())
    (service,) = render["services"]
    assert service["type"] == "web"
    assert service["runtime"] == "docker"
    assert (REPO / service["dockerfilePath"]).resolve() == REPO / "Dockerfile"
    assert service["healthCheckPath"] == "/v1/health"
    assert service["disk"]["mountPath"] == "/data"
    assert service["numInstances"] == 1  # a service with a disk runs one instance
    env = {e["key"]: e for e in service["envVars"]}
    assert set(env) <= KNOB_ENVS
    assert env["HIVE_RELAY_DATA_DIR"]["value"] == "/data"
    # Secrets are never values in the file: asked for, or generated by Render.
    for secret in ("HIVE_RELAY_ACCESS_TOKENS", "HIVE_RELAY_METRICS_TOKEN"):
        assert "value" not in env[secret]
        assert env[secret].get("sync") is False or env[secret].get("generateValue") is True
    # Documented: every variable has a comment right above it.
    lines = (REPO / "render.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- key: HIVE_RELAY_") and "LOG_FORMAT" not in line:
            assert lines[i - 1].strip().startswith("#"), line


# ------------------------------------------------------------------ Caddy
def test_caddyfile_adapts_cleanly_and_matches_the_relay_settings() -> None:
    caddy = require_tool("caddy")
    done = subprocess.run(
        [caddy, "adapt", "--config", str(DEPLOY / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # No warnings (unformatted file, needless directives): stderr is empty of them.
    assert '"level":"warn"' not in done.stderr, done.stderr
    config = json.loads(done.stdout)
    handlers = _find(config, "handler")
    proxy = next(h for h in handlers if h["handler"] == "reverse_proxy")
    assert proxy["flush_interval"] == -1
    assert not any(h["handler"] == "encode" for h in handlers), "no compression of streams"
    (upstream,) = proxy["upstreams"]
    active, _ = _env_example()
    assert upstream["dial"] == active["HIVE_RELAY_ADDR"]
    # Caddy dials the relay on loopback, so the relay sees it as 127.0.0.1: the one
    # address the relay trusts for X-Forwarded-For.
    assert upstream["dial"].split(":")[0] == active["HIVE_RELAY_TRUSTED_PROXIES"] == "127.0.0.1"
    formatted = subprocess.run(
        [caddy, "fmt", str(DEPLOY / "Caddyfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert formatted.stdout == (DEPLOY / "Caddyfile").read_text()


def _find(node: Any, key: str) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if key in node:
            found.append(node)
        for value in node.values():
            found += _find(value, key)
    elif isinstance(node, list):
        for value in node:
            found += _find(value, key)
    return found


# -------------------------------------------------------------------- docs
def test_operations_doc_covers_every_setting_and_metric(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    missing = sorted(env for env in KNOB_ENVS if f"`{env}`" not in doc)
    assert missing == [], f"docs/operations.md lacks {missing}"
    for heading in (
        "Install",
        "Configure",
        "TLS",
        "Tokens",
        "Backups",
        "Upgrades",
        "Monitoring",
        "Scaling out",
        "Troubleshooting",
    ):
        assert re.search(rf"^#+ .*{heading}", doc, re.M), heading
    assert "scaling.md" in doc and "relay.snapshot" in doc
    for code in ("401", "403", "413", "429", "503"):
        assert code in doc
    # Every metric the doc tells operators to watch is one the relay exports.
    from prometheus_client import generate_latest

    from relay.app import create_app

    # With a data directory and direct TLS, so that the journal's and the
    # certificate's metrics are there too; and the Redis store's PING families.
    from relay.status import RoundTrip
    from tests.certs import TestCA

    TestCA().issue("recipes").write(tmp_path / "cert.pem", tmp_path / "key.pem")
    app = create_app(
        Settings(
            data_dir=str(tmp_path / "data"),
            tls_cert=str(tmp_path / "cert.pem"),
            tls_key=str(tmp_path / "key.pem"),
        )
    )
    relay = app.state.relay
    relay.metrics.add_collector(RoundTrip(asyncio.sleep).collect)
    exported = generate_latest(relay.metrics.registry).decode()
    names = set(re.findall(r"^(hive_relay_\w+)", exported, re.M))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for name, kind in re.findall(r"^# TYPE (hive_relay_\w+) (\w+)", exported, re.M):
        names |= {name, *(name + s for s in suffixes.get(kind, ()))}
    named = set(re.findall(r"\b(hive_relay_\w+)", doc)) - {"hive_relay_data"}  # Fly volume
    assert named, "the doc names the metrics to alert on"
    assert named <= names, sorted(named - names)


def test_every_recipe_file_is_where_the_docs_say() -> None:
    for rel in (
        "Dockerfile",
        ".dockerignore",
        "fly.toml",
        "render.yaml",
        "deploy/hive-relay.service",
        "deploy/Caddyfile",
        "deploy/docker-compose.yml",
        "deploy/hive-relay.env.example",
        "deploy/container-entrypoint.py",
    ):
        assert (REPO / rel).is_file(), rel
        assert rel in (REPO / "docs" / "operations.md").read_text() or rel in (
            ".dockerignore",
            "deploy/container-entrypoint.py",
        ), rel
