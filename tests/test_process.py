"""`python -m relay` as a real process: start-up errors, bind address, --help,
SIGTERM, and the request log."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.settings import KNOBS, default_max_bytes
from tests.relayproc import REPO, RelayProcess, free_port, relay_env

pytestmark = pytest.mark.slow

SECRET_WS = "ws-3e9d1c7a-secret"
SECRET_TOKEN = "tok-5b2f8e0c-secret"
WRONG_TOKEN = "tok-wrong-44a1-secret"
SECRET_BODY = b'{"body":"plaintext-9f3e-secret"}'
PAIR_PAYLOAD = "pair-payload-77c0-secret"


def run_relay(
    env: dict[str, str] | None = None, args: tuple[str, ...] = (), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `python -m relay` to completion (a relay that starts instead is killed: a failure)."""
    extra = {"HIVE_RELAY_ADDR": f"127.0.0.1:{free_port()}", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=REPO,
        env=relay_env(extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ----------------------------------------------------------- start-up errors
@pytest.fixture(scope="module")
def empty_token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("# no tokens yet\n\n")
    return path


BAD_SETTINGS: dict[str, tuple[dict[str, str], tuple[str, ...], str]] = {
    "unparseable_number": ({"HIVE_RELAY_MAX_BODY_BYTES": "lots"}, (), "HIVE_RELAY_MAX_BODY_BYTES"),
    "unparseable_flag": ({}, ("--push-rate", "fast"), "HIVE_RELAY_PUSH_RATE"),
    "number_out_of_range": ({"HIVE_RELAY_MAX_BODY_BYTES": "1"}, (), "HIVE_RELAY_MAX_BODY_BYTES"),
    "unknown_store": ({"HIVE_RELAY_STORE": "ftp://files.example"}, (), "HIVE_RELAY_STORE"),
    "bad_pubkey": ({"HIVE_RELAY_TOKEN_PUBKEY": "not-a-key"}, (), "HIVE_RELAY_TOKEN_PUBKEY"),
    "short_pubkey": ({"HIVE_RELAY_TOKEN_PUBKEY": "ab" * 31}, (), "HIVE_RELAY_TOKEN_PUBKEY"),
    "missing_token_file": (
        {"HIVE_RELAY_ACCESS_TOKENS_FILE": "/nonexistent/hive-relay/tokens"},
        (),
        "HIVE_RELAY_ACCESS_TOKENS_FILE",
    ),
    "empty_token_file": (
        {"HIVE_RELAY_ACCESS_TOKENS_FILE": "@empty"},
        (),
        "HIVE_RELAY_ACCESS_TOKENS_FILE",
    ),
    "bad_port": ({"PORT": "http"}, (), "PORT"),
    "bad_addr": ({"HIVE_RELAY_ADDR": "nowhere"}, (), "HIVE_RELAY_ADDR"),
    "bad_log_format": ({"HIVE_RELAY_LOG_FORMAT": "xml"}, (), "HIVE_RELAY_LOG_FORMAT"),
}


@pytest.mark.parametrize(("env", "args", "name"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_setting_stops_start_up_with_one_clear_line(
    env: dict[str, str], args: tuple[str, ...], name: str, empty_token_file: Path
) -> None:
    env = {k: str(empty_token_file) if v == "@empty" else v for k, v in env.items()}
    out = run_relay(env, args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stdout.strip() == ""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert name in lines[0]
    assert "listening" not in out.stderr


def test_token_file_that_is_a_directory_stops_start_up(tmp_path: Path) -> None:
    # A token file that cannot be read never yields an open relay: the process exits.
    out = run_relay({"HIVE_RELAY_ACCESS_TOKENS_FILE": str(tmp_path)})  # a directory
    assert out.returncode == 2
    assert "HIVE_RELAY_ACCESS_TOKENS_FILE" in out.stderr


# ----------------------------------------------------------------- --help
def test_help_lists_every_setting_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--help"],
        cwd=REPO,
        env=relay_env({"COLUMNS": "100"}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # undo argparse's line wrapping
    for knob in KNOBS:
        assert knob.flag in text, knob.flag
        assert f"env {knob.env};" in text, knob.env
        if knob.env == "HIVE_RELAY_MAX_BYTES":
            assert f"default {default_max_bytes()}" in text
        else:
            shown = "unset" if knob.default == "" else str(knob.default)
            assert f"env {knob.env}; default {shown}" in text, knob.env
    for expected in (
        "default 0.0.0.0:8443",
        "default memory://",
        "default 4194304",
        "default 8388608",
        "default 50000",
        "default 300",
        "default 2000",
    ):
        assert expected in text
    assert "--port" in text and "env PORT" in text


# ------------------------------------------------------------- bind address
def listening_line(proc: RelayProcess) -> str:
    lines = [line for line in proc.logs().splitlines() if "listening on" in line]
    assert len(lines) == 1, proc.logs()
    return lines[0]


def test_port_wins_over_hive_relay_addr() -> None:
    port, other = free_port(), free_port()
    env = {"PORT": str(port), "HIVE_RELAY_ADDR": f"127.0.0.1:{other}"}
    with RelayProcess(port=port, env=env) as proc:  # healthy on $PORT
        assert f"listening on 0.0.0.0:{port} " in listening_line(proc)
    assert proc.stop() == 0


def test_flag_wins_over_port_and_hive_relay_addr() -> None:
    port = free_port()
    env = {"PORT": str(free_port()), "HIVE_RELAY_ADDR": f"127.0.0.1:{free_port()}"}
    with RelayProcess(port=port, env=env, args=["--addr", f"127.0.0.1:{port}"]) as proc:
        assert f"listening on 127.0.0.1:{port} " in listening_line(proc)


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_ends_live_streams_and_exits_0() -> None:
    with RelayProcess(env={"HIVE_RELAY_SHUTDOWN_TIMEOUT": "20"}) as proc:
        url = f"{proc.url}/v1/workspaces/sigterm-test/events"
        with httpx.stream("GET", url, timeout=httpx.Timeout(30)) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            proc.send_signal(signal.SIGTERM)
            for _ in lines:  # the relay ends the stream; this loop then returns
                pass
        assert proc.proc is not None
        code = proc.proc.wait(30)
    assert code == 0
    assert "Traceback" not in proc.logs()


def test_sigint_stops_gracefully_and_exits_0() -> None:
    # uvicorn raises the signal again once it has stopped; the relay's handler takes it.
    with RelayProcess() as proc:
        with httpx.stream("GET", f"{proc.url}/v1/workspaces/sigint-test/events") as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            proc.send_signal(signal.SIGINT)
            for _ in lines:
                pass
        assert proc.proc is not None
        code = proc.proc.wait(30)
    assert code == 0
    assert "signal SIGINT: shutting down" in proc.logs()
    assert "Traceback" not in proc.logs() and "KeyboardInterrupt" not in proc.logs()


# -------------------------------------------------------------- request log
def access_lines(log: str) -> list[dict[str, str]]:
    out = []
    for line in log.splitlines():
        m = re.search(r" relay\.access request (.*)$", line)
        if m:
            out.append(dict(kv.split("=", 1) for kv in m.group(1).split()))
    return out


def make_requests(base: str) -> tuple[list[tuple[str, str, str]], str]:
    """A mix of answers; returns the (method, route, status) each should log, and
    the pairing code used (which must not be logged either)."""
    auth = {"Authorization": f"Bearer {SECRET_TOKEN}"}
    wrong = {"Authorization": f"Bearer {WRONG_TOKEN}"}
    ws = f"/v1/workspaces/{SECRET_WS}"
    with httpx.Client(base_url=base, timeout=10) as http:
        answers = [
            http.post(f"{ws}/envelopes", content=SECRET_BODY, headers=auth),
            http.get(f"{ws}/envelopes?after=0", headers=auth),
            http.post(f"{ws}/envelopes", content=SECRET_BODY, headers=wrong),
            http.post(f"{ws}/envelopes/batch", content=b"[" + SECRET_BODY + b"]", headers=auth),
            http.get(f"{ws}/keyring", headers=auth),
            http.post("/v1/pair", json={"payload": PAIR_PAYLOAD}, headers=auth),
            http.get(f"{ws}/nowhere", headers=auth),
            http.delete(f"{ws}/envelopes", headers=auth),
        ]
        code = answers[5].json()["code"]
        answers.append(http.get(f"/v1/pair/{code}", headers=auth))
    assert [r.status_code for r in answers] == [200, 200, 401, 200, 200, 200, 404, 405, 200]
    assert answers[-1].json() == {"payload": PAIR_PAYLOAD}
    routes = [
        ("POST", "/v1/workspaces/{ws}/envelopes", "200"),
        ("GET", "/v1/workspaces/{ws}/envelopes", "200"),
        ("POST", "/v1/workspaces/{ws}/envelopes", "401"),
        ("POST", "/v1/workspaces/{ws}/envelopes/batch", "200"),
        ("GET", "/v1/workspaces/{ws}/keyring", "200"),
        ("POST", "/v1/pair", "200"),
        ("GET", "unmatched", "404"),
        ("DELETE", "/v1/workspaces/{ws}/envelopes", "405"),
        ("GET", "/v1/pair/{code}", "200"),
    ]
    return routes, code


def assert_log_is_content_blind(log: str, code: str) -> None:
    for secret in (SECRET_WS, SECRET_TOKEN, WRONG_TOKEN, "plaintext-9f3e", PAIR_PAYLOAD, code):
        assert secret not in log, secret


def test_request_log_one_line_per_request_without_ids_bodies_or_tokens() -> None:
    with RelayProcess(env={"HIVE_RELAY_ACCESS_TOKENS": SECRET_TOKEN}) as proc:
        expected, code = make_requests(proc.url)
        assert proc.stop() == 0
    log = proc.logs()
    lines = [e for e in access_lines(log) if e.get("route") != "/v1/health"]
    assert [(e["method"], e["route"], e["status"]) for e in lines] == expected
    for entry in lines:
        assert float(entry["ms"]) >= 0
        assert entry["client"] == "127.0.0.1"
    assert_log_is_content_blind(log, code)
    assert "Traceback" not in log


def test_json_log_format() -> None:
    env = {"HIVE_RELAY_ACCESS_TOKENS": SECRET_TOKEN, "HIVE_RELAY_LOG_FORMAT": "json"}
    with RelayProcess(env=env) as proc:
        expected, code = make_requests(proc.url)
        assert proc.stop() == 0
    log = proc.logs()
    records: list[dict[str, Any]] = []
    for line in log.splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line is one JSON object
    assert all(isinstance(r, dict) and r.get("level") and "msg" in r for r in records)
    access = [
        r for r in records if r.get("logger") == "relay.access" and r.get("route") != "/v1/health"
    ]
    assert [(r["method"], r["route"], str(r["status"])) for r in access] == expected
    assert all(isinstance(r["status"], int) and isinstance(r["ms"], int | float) for r in access)
    assert any("listening on" in r["msg"] for r in records)
    assert_log_is_content_blind(log, code)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_sigkill_loses_no_access_line_older_than_the_flush_interval(log_format: str) -> None:
    """Access lines are buffered (relay/logs.py); a SIGKILL loses at most the last
    FLUSH_INTERVAL of them. Every request here was answered well before the kill."""
    from relay.logs import FLUSH_INTERVAL

    with RelayProcess(env={"HIVE_RELAY_LOG_FORMAT": log_format}) as proc:
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            for i in range(30):
                http.post("/v1/workspaces/killed/envelopes", json={"i": i}).raise_for_status()
                http.get("/v1/workspaces/killed/envelopes?after=0").raise_for_status()
            assert http.get("/v1/workspaces/killed/nowhere").status_code == 404
        time.sleep(max(0.5, 10 * FLUSH_INTERVAL))
        assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    log = proc.logs()
    if log_format == "json":
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]
        lines = [
            (e["method"], e["route"], str(e["status"]))
            for e in entries
            if e.get("logger") == "relay.access" and e["route"] != "/v1/health"
        ]
    else:
        lines = [
            (e["method"], e["route"], e["status"])
            for e in access_lines(log)
            if e["route"] != "/v1/health"
        ]
    route = "/v1/workspaces/{ws}/envelopes"
    assert lines == [("POST", route, "200"), ("GET", route, "200")] * 30 + [
        ("GET", "unmatched", "404")
    ]
