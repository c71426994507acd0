"""`python -m client` end to end: real subprocesses against a real relay."""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from client import Device, Keyring, RelayClient, WorkspaceKey, open_envelope, seal
from client.__main__ import main
from tests.client.support import WAIT
from tests.conftest import FIXTURES
from tests.relayproc import REPO, RelayProcess, free_port

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

VECTORS = json.loads((FIXTURES / "hive_crypto_vectors.json").read_text())
PASSPHRASE = VECTORS["passphrase"]


def cli_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m client ARGS` in a subprocess: the real thing, end to end."""
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=REPO,
        env=cli_env(env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=2 * WAIT,
        check=False,
    )


def cli(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The same CLI entry point called in-process (fast), for the many variations."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), env or {}, stdin=io.StringIO(stdin or ""), stdout=out, stderr=err)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def env(relay: RelayProcess, ws_id: str) -> dict[str, str]:
    return {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": PASSPHRASE}


def keyring() -> Keyring:
    return Keyring.single(WorkspaceKey.from_passphrase(PASSPHRASE))


# --------------------------------------------------------------------------- keys


def test_keygen() -> None:
    result = run_cli("keygen")
    assert result.returncode == 0
    WorkspaceKey.from_hex(result.stdout.strip())
    assert cli("keygen").stdout != result.stdout

    pair = json.loads(cli("keygen", "--device").stdout)
    assert Device.from_hex("d", pair["secret"]).public_hex == pair["public"]


def test_derive_key() -> None:
    result = run_cli("derive-key", PASSPHRASE)
    assert (result.returncode, result.stdout.strip()) == (0, VECTORS["derived_key_hex"])
    from_stdin = cli("derive-key", "-", stdin=PASSPHRASE + "\n")
    assert from_stdin.stdout.strip() == VECTORS["derived_key_hex"]
    assert cli("derive-key", "").returncode == 2


# --------------------------------------------------------------------------- send


def test_send_seals_the_json_as_given(env: dict[str, str], relay: RelayProcess, ws_id: str) -> None:
    text = '{"b": 2,  "a": [1, "\\u2713"]}'
    result = run_cli("send", text, env=env)
    assert result.returncode == 0, result.stderr
    seq = int(result.stdout)
    from_stdin = cli("send", env=env, stdin='{"via": "stdin"}\n')
    assert from_stdin.returncode == 0, from_stdin.stderr
    with RelayClient(relay.url) as api:
        rows = api.fetch(ws_id).rows
    assert [r.seq for r in rows] == [seq, int(from_stdin.stdout)]
    assert b"via" not in rows[1].body
    body = json.loads(rows[0].body)
    assert set(body) == {"ciphertext", "nonce", "version"}  # the Hive format
    assert open_envelope(rows[0].body, keyring()).plaintext == text.encode()


def test_send_rejects_bad_input_and_missing_settings(env: dict[str, str]) -> None:
    bad = cli("send", "{nope", env=env)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    missing = cli("send", "{}", env={k: v for k, v in env.items() if k != "HIVE_RELAY_URL"})
    assert missing.returncode == 2 and "HIVE_RELAY_URL" in missing.stderr
    # The message names the setting as the user set it: the variable, or the flag.
    bad_epoch = cli("send", "{}", env={**env, "HIVE_WORKSPACE_KEY_EPOCH": "x"})
    assert bad_epoch.returncode == 2 and "HIVE_WORKSPACE_KEY_EPOCH" in bad_epoch.stderr
    bad_flag = cli("send", "--key-epoch", "x", "{}", env=env)
    assert bad_flag.returncode == 2 and "--key-epoch" in bad_flag.stderr
    assert "HIVE_WORKSPACE_KEY_EPOCH" not in bad_flag.stderr


def test_send_explains_an_unreachable_relay(env: dict[str, str]) -> None:
    result = cli("send", "{}", env={**env, "HIVE_RELAY_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 1 and "cannot reach the relay" in result.stderr


# --------------------------------------------------------------------------- tail


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_tail_once(env: dict[str, str], relay: RelayProcess, ws_id: str) -> None:
    first = int(cli("send", '{"n":1}', env=env).stdout)
    with RelayClient(relay.url) as api:
        stranger = api.push(ws_id, seal(b'{"n":"?"}', WorkspaceKey.generate(), 0)).seq
        hive = api.push(ws_id, (FIXTURES / "hive_envelopes" / "member_added.json").read_bytes())
    last = int(cli("send", '{"n":2}', env=env).stdout)

    result = run_cli("tail", "--once", env=env)
    assert result.returncode == 1, result.stderr  # some envelopes could not be opened
    assert lines(result.stdout) == [
        {"seq": first, "event": {"n": 1}},
        {"seq": last, "event": {"n": 2}},
    ]
    doing, *reported, summary = result.stderr.splitlines()
    assert doing == f"reading {env['HIVE_RELAY_URL']} (workspace {ws_id!r})"
    assert [line.split(":")[0] for line in reported] == [f"seq {stranger}", f"seq {hive.seq}"]
    assert "wrong key" in reported[0] and "Traceback" not in result.stderr
    assert summary == "2 envelopes could not be opened (key epoch 0: 2)"  # the fixture is epoch 0

    after = cli("tail", "--once", "--after", str(hive.seq), env=env)
    assert lines(after.stdout) == [{"seq": last, "event": {"n": 2}}]
    assert after.returncode == 0  # everything it read opened


def test_tail_with_a_cursor_file(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "HIVE_CURSOR_FILE": str(tmp_path / "cursor.json")}
    cli("send", '{"n":1}', env=env)
    assert len(lines(cli("tail", "--once", env=env).stdout)) == 1
    assert cli("tail", "--once", env=env).stdout == ""
    cli("send", '{"n":2}', env=env)
    assert [line["event"] for line in lines(cli("tail", "--once", env=env).stdout)] == [{"n": 2}]


def test_tail_stops_at_a_missing_key_epoch(
    env: dict[str, str], relay: RelayProcess, ws_id: str
) -> None:
    first = int(cli("send", '{"n":1}', env=env).stdout)
    with RelayClient(relay.url) as api:
        locked = api.push(ws_id, seal(b'{"n":2}', WorkspaceKey.generate(), 1)).seq
    cli("send", '{"n":3}', env=env)
    result = cli("tail", "--once", env=env)
    assert lines(result.stdout) == [{"seq": first, "event": {"n": 1}}]  # the cursor stopped
    assert f"seq {locked}: sealed with key epoch 1" in result.stderr
    assert result.returncode == 1


def test_tail_follows_live(env: dict[str, str]) -> None:
    cli("send", '{"n":0}', env=env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "client", "tail"],
        cwd=REPO,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, out = proc.stdout, queue.Queue[str]()
    threading.Thread(target=lambda: [out.put(line) for line in stdout], daemon=True).start()
    try:
        assert json.loads(out.get(timeout=WAIT))["event"] == {"n": 0}
        cli("send", '{"n":1}', env=env)
        assert json.loads(out.get(timeout=WAIT))["event"] == {"n": 1}
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT)
        stderr = proc.stderr.read()
        proc.stderr.close()
        stdout.close()
    assert "Traceback" not in stderr


# --------------------------------------------------------------------------- probe


def test_probe_ok(env: dict[str, str]) -> None:
    cli("send", '{"n":1}', env=env)
    result = run_cli("probe", env=env)
    assert result.returncode == 0, result.stderr
    assert "ok: relay reachable" in result.stdout
    assert "ok: no token needed" in result.stdout
    assert "ok: live event stream offered" in result.stdout
    assert "ok: the key opens the newest envelope" in result.stdout


def test_probe_failures_are_actionable(env: dict[str, str]) -> None:
    down = cli("probe", env={**env, "HIVE_RELAY_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "cannot reach the relay" in down.stderr

    cli("send", '{"n":1}', env=env)
    wrong_key = cli("probe", env={**env, "HIVE_WORKSPACE_KEY": "another passphrase"})
    assert wrong_key.returncode == 1 and "does not open the newest envelope" in wrong_key.stderr

    no_url = cli("probe", env={})
    assert no_url.returncode == 2 and "HIVE_RELAY_URL" in no_url.stderr

    # A flag wins over its environment variable.
    flagged = cli("probe", "--url", env["HIVE_RELAY_URL"], env={**env, "HIVE_RELAY_URL": "x"})
    assert flagged.returncode == 0, flagged.stderr


@pytest.fixture(scope="module")
def token_relay() -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_ACCESS_TOKENS": "good-token"}) as proc:
        yield proc


def test_probe_and_send_with_tokens(token_relay: RelayProcess, ws_id: str) -> None:
    env = {
        "HIVE_RELAY_URL": token_relay.url,
        "HIVE_WORKSPACE": ws_id,
        "HIVE_WORKSPACE_KEY": PASSPHRASE,
    }
    missing = cli("probe", env=env)
    assert missing.returncode == 1 and "HIVE_RELAY_ACCESS_TOKEN" in missing.stderr
    wrong = cli("probe", "--token", "bad-token", env=env)
    assert wrong.returncode == 1 and "rejected the access token" in wrong.stderr
    refused = cli("send", "{}", env=env)
    assert refused.returncode == 1 and "HIVE_RELAY_ACCESS_TOKEN" in refused.stderr

    env["HIVE_RELAY_ACCESS_TOKEN"] = "good-token"
    ok = cli("probe", env=env)
    assert ok.returncode == 0 and "ok: token accepted" in ok.stdout
    assert cli("send", '{"n":1}', env=env).returncode == 0
    assert lines(cli("tail", "--once", env=env).stdout)[0]["event"] == {"n": 1}
