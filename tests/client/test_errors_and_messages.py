"""Errors a user can act on: oversized bodies, bad settings, and the CLI's one-line messages."""

from __future__ import annotations

import inspect
import json
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import client
from client import (
    DEFAULT_MAX_BODY_BYTES,
    AsyncRelayClient,
    ConfigError,
    Device,
    Event,
    PayloadTooLarge,
    RelayClient,
    SyncWorkspace,
    Unauthorized,
    Workspace,
    WorkspaceKey,
)
from tests.client.support import FAST, WAIT
from tests.client.test_client_cli import cli, cli_env, run_cli
from tests.relayproc import REPO, RelayProcess, free_port

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

KEY = WorkspaceKey.generate()


def repeated_phrase(text: str, size: int = 24) -> str | None:
    """A run of `size` characters that occurs twice in `text`, if any."""
    for start in range(len(text) - size):
        chunk = text[start : start + size]
        if text.find(chunk, start + 1) != -1:
            return chunk
    return None


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert repeated_phrase(lines[0]) is None, lines[0]
    return lines[0]


def rows(relay: RelayProcess, ws_id: str) -> list[Any]:
    with RelayClient(relay.url) as api:
        return api.fetch(ws_id).rows


# --------------------------------------------------------------------------- oversized bodies

OVER = b'"' + b"a" * DEFAULT_MAX_BODY_BYTES + b'"'  # one byte of JSON past the default limit


def test_both_clients_refuse_a_body_over_the_limit_before_sending(
    relay: RelayProcess, ws_id: str
) -> None:
    with RelayClient(relay.url) as api, pytest.raises(PayloadTooLarge) as sync_err:
        api.push(ws_id, OVER)

    async def push_async() -> PayloadTooLarge:
        async with AsyncRelayClient(relay.url) as api:
            with pytest.raises(PayloadTooLarge) as caught:
                await api.push(ws_id, OVER)
            with pytest.raises(PayloadTooLarge):
                await api.push_batch(ws_id, [OVER[:-2] + b'"'])  # the brackets tip it over
            return caught.value

    async_err = anyio.run(push_async)
    for err in (sync_err.value, async_err):
        assert err.status is None and err.code == "payload_too_large"  # refused unsent
        assert f"{len(OVER)} bytes" in str(err) and str(DEFAULT_MAX_BODY_BYTES) in str(err)
    assert rows(relay, ws_id) == []


@pytest.fixture(scope="module")
def small_relay() -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_MAX_BODY_BYTES": "100000"}) as proc:
        yield proc


def test_a_413_answer_is_payload_too_large_in_both_clients(
    small_relay: RelayProcess, ws_id: str
) -> None:
    body = b'"' + b"a" * 200_000 + b'"'
    with RelayClient(small_relay.url, max_body_bytes=None) as api:
        with pytest.raises(PayloadTooLarge) as sync_err:
            api.push(ws_id, body)

    async def push_async() -> PayloadTooLarge:
        async with AsyncRelayClient(small_relay.url, max_body_bytes=None) as api:
            with pytest.raises(PayloadTooLarge) as caught:
                await api.push(ws_id, body)
            return caught.value

    for err in (sync_err.value, anyio.run(push_async)):
        assert (err.status, err.code) == (413, "payload_too_large")


@pytest.mark.anyio
async def test_workspace_send_refuses_an_event_that_seals_too_large(
    relay: RelayProcess, ws_id: str
) -> None:
    text = "x" * 1_200_000  # fits 4 MiB as JSON; its Hive seal is about 3.6 times that
    async with Workspace(relay.url, ws_id, KEY, **FAST) as ws:
        with pytest.raises(PayloadTooLarge) as caught:
            await ws.send({"text": text})
        assert "3.6" in str(caught.value) and "nothing was sent" in str(caught.value)
        assert ws.client.max_body_bytes == DEFAULT_MAX_BODY_BYTES
        # The compact format (about 1.34 times) fits the same event.
        assert await ws.send({"text": text}, format="compact") >= 1
        with pytest.raises(PayloadTooLarge, match="object 1"):
            await ws.send_many([{"n": 0}, {"text": text}])
    assert len(rows(relay, ws_id)) == 1


def test_sync_workspace_send_refuses_it_too(relay: RelayProcess, ws_id: str) -> None:
    with SyncWorkspace(relay.url, ws_id, KEY, **FAST) as ws, pytest.raises(PayloadTooLarge):
        ws.send({"text": "x" * 1_200_000})
    assert rows(relay, ws_id) == []


@pytest.mark.anyio
async def test_send_many_splits_batches_to_fit_the_limit(
    small_relay: RelayProcess, ws_id: str
) -> None:
    objs = [{"n": n, "pad": "p" * 3000} for n in range(60)]  # ~11 kB sealed each, 650 kB total
    async with Workspace(small_relay.url, ws_id, KEY, max_body_bytes=100_000, **FAST) as ws:
        seqs = await ws.send_many(objs)
        assert seqs == sorted(seqs) and len(seqs) == 60
        items = [i async for i in ws.events(live=False)]
    assert [i.data["n"] for i in items if isinstance(i, Event)] == list(range(60))


def test_the_cli_explains_an_oversized_send(relay: RelayProcess, ws_id: str) -> None:
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": KEY.hex()}
    big = json.dumps({"text": "x" * 1_200_000})
    line = one_line_error(run_cli("send", env=env, stdin=big), code=1)
    assert "over the relay's body limit" in line and "HIVE_RELAY_MAX_BODY_BYTES" in line
    assert rows(relay, ws_id) == []


# --------------------------------------------------------------------------- workspace ids


@pytest.mark.parametrize("bad", ["bad/ws", ".", "..", "", "a b", "x" * 201])
def test_an_invalid_workspace_id_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"workspace id"):
        Workspace("http://relay.test", bad, KEY)
    env = {"HIVE_RELAY_URL": "http://relay.test", "HIVE_WORKSPACE": bad, "HIVE_WORKSPACE_KEY": "k"}
    if bad:  # an empty variable is "not set", reported as such
        with pytest.raises(ConfigError, match=r"^HIVE_WORKSPACE: invalid workspace id"):
            Workspace.from_env(env)
    with RelayClient("http://relay.test") as api, pytest.raises(ConfigError):
        api.fetch(bad)


@pytest.mark.parametrize("bad", ["bad/ws", ".", ".."])
def test_the_cli_refuses_an_invalid_workspace_id_in_one_line(relay: RelayProcess, bad: str) -> None:
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": bad, "HIVE_WORKSPACE_KEY": KEY.hex()}
    for command in (("send", "{}"), ("tail", "--once"), ("probe",), ("rotate", "a=" + "1" * 64)):
        line = one_line_error(
            run_cli(*command, env=env) if command[0] == "send" else cli(*command, env=env)
        )
        assert line.startswith("error: HIVE_WORKSPACE: invalid workspace id"), (command, line)
        assert "HIVE_RELAY_URL" not in line
    flagged = one_line_error(cli("tail", "--once", "-w", bad, env={**env, "HIVE_WORKSPACE": "ok"}))
    assert flagged.startswith("error: --workspace: invalid workspace id")


def test_a_404_names_the_url_setting_not_the_workspace(relay: RelayProcess, ws_id: str) -> None:
    env = {"HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": KEY.hex()}
    line = one_line_error(cli("send", "{}", "--url", relay.url + "/v1", env=env), code=1)
    assert "404" in line and "--url" in line and "without /v1" in line
    assert "HIVE_RELAY_URL" not in line and "workspace id" not in line


# --------------------------------------------------------------------------- messages


def test_an_unreachable_relay_is_said_once(ws_id: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {"HIVE_RELAY_URL": url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": KEY.hex()}
    for result in (cli("send", "{}", env=env), cli("probe", env=env)):
        line = one_line_error(result, code=1)
        assert line.count("cannot reach") == 1 and "HIVE_RELAY_URL" in line
    flagged = one_line_error(cli("probe", "--url", url, env={}), code=1)
    assert "--url" in flagged and "HIVE_RELAY_URL" not in flagged


@pytest.fixture(scope="module")
def token_relay() -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_ACCESS_TOKENS": "good-token"}) as proc:
        yield proc


def test_a_missing_token_is_not_a_rejected_token(token_relay: RelayProcess, ws_id: str) -> None:
    with RelayClient(token_relay.url) as api, pytest.raises(Unauthorized) as none_sent:
        api.fetch(ws_id)
    with RelayClient(token_relay.url, "bad") as api, pytest.raises(Unauthorized) as rejected:
        api.fetch(ws_id)
    assert none_sent.value.token_sent is False and rejected.value.token_sent is True
    assert "no access token was sent" in str(none_sent.value)
    assert "rejected the access token" in str(rejected.value)

    env = {"HIVE_RELAY_URL": token_relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": "k"}
    missing = one_line_error(cli("send", "{}", env=env), code=1)
    assert "no access token was sent" in missing and "rejected" not in missing
    assert "HIVE_RELAY_ACCESS_TOKEN" in missing
    by_env = one_line_error(cli("send", "{}", env={**env, "HIVE_RELAY_ACCESS_TOKEN": "x"}), 1)
    assert "rejected the access token" in by_env and "no access token" not in by_env
    assert "HIVE_RELAY_ACCESS_TOKEN" in by_env and "--token" not in by_env
    by_flag = one_line_error(cli("probe", "--token", "x", env=env), code=1)
    assert "rejected the access token" in by_flag and "--token" in by_flag
    assert "HIVE_RELAY_ACCESS_TOKEN" not in by_flag


@pytest.mark.parametrize(
    ("env_extra", "flags", "named"),
    [
        ({"HIVE_RELAY_URL": "relay.example:8443"}, (), "HIVE_RELAY_URL"),
        ({}, ("--url", "ftp://relay.example"), "--url"),
        ({"HIVE_RELAY_URL": "http://relay.example:port"}, (), "HIVE_RELAY_URL"),
        ({"HIVE_RELAY_URL": "http://"}, (), "HIVE_RELAY_URL"),
        ({"HIVE_DEVICE_ID": "d", "HIVE_DEVICE_KEY": "zz"}, (), "HIVE_DEVICE_KEY"),
        ({"HIVE_DEVICE_ID": "d"}, ("--device-key", "12ab"), "--device-key"),
        ({"HIVE_DEVICE_ID": "d"}, (), "HIVE_DEVICE_KEY"),
        ({"HIVE_RELAY_MAX_BODY_BYTES": "lots"}, (), "HIVE_RELAY_MAX_BODY_BYTES"),
    ],
)
def test_settings_errors_name_what_the_user_set(
    env_extra: dict[str, str], flags: tuple[str, ...], named: str
) -> None:
    env = {
        "HIVE_RELAY_URL": "http://relay.test",
        "HIVE_WORKSPACE": "w",
        "HIVE_WORKSPACE_KEY": KEY.hex(),
        **env_extra,
    }
    line = one_line_error(cli("send", *flags, "{}", env=env))
    assert named in line, line
    other = {"--url": "HIVE_RELAY_URL", "--device-key": "HIVE_DEVICE_KEY"}.get(named)
    if other is not None:
        assert other not in line
    if "KEY" in named.upper() and ("HIVE_DEVICE_KEY" in env_extra or flags):
        assert "64 hex characters" in line and "keygen --device" in line


def test_device_key_and_bytes_key_messages() -> None:
    for bad in ("zz", "12ab", "g" * 64):
        with pytest.raises(ValueError, match="64 hex characters"):
            Device.from_hex("d", bad)
    ws = Workspace("http://relay.test", "w", KEY.material)  # 32 raw bytes: the key itself
    assert ws.keyring.current_key == KEY
    for bad_key in (b"short", b"0" * 64, bytearray(31)):
        with pytest.raises(ConfigError, match="32 raw key bytes"):
            Workspace("http://relay.test", "w", bad_key)
    with pytest.raises(ConfigError, match="got int"):
        Workspace("http://relay.test", "w", 42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url", ["relay.example", "ftp://relay.example", "http://", "http://h:abc", "http://h?x=1"]
)
def test_bad_urls_are_config_errors_everywhere(url: str) -> None:
    with pytest.raises(ConfigError):
        RelayClient(url)
    with pytest.raises(ConfigError):
        AsyncRelayClient(url)
    with pytest.raises(ConfigError):
        Workspace(url, "w", KEY)
    with pytest.raises(ConfigError, match=r"^HIVE_RELAY_URL: "):
        Workspace.from_env(
            {"HIVE_RELAY_URL": url, "HIVE_WORKSPACE": "w", "HIVE_WORKSPACE_KEY": "k"}
        )


# --------------------------------------------------------------------------- tail on stderr


def test_tail_says_what_it_is_doing(relay: RelayProcess, ws_id: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    env = {"HIVE_RELAY_URL": down, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": KEY.hex()}
    assert stderr_of_tail(env, until="reconnecting in") == [
        f"connecting to {down} (workspace {ws_id!r})",
        "reconnecting in",
    ]
    up = {**env, "HIVE_RELAY_URL": relay.url}
    assert stderr_of_tail(up, until="connected:") == [
        f"connecting to {relay.url} (workspace {ws_id!r})",
        f"connected: following workspace {ws_id!r} live over sse",
    ]


def stderr_of_tail(env: dict[str, str], until: str) -> list[str]:
    """Lines `tail` (live) writes to stderr, up to the first one starting with `until`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "client", "tail"],
        cwd=REPO,
        env=cli_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    stderr, lines = proc.stderr, queue.Queue[str]()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while not seen or not seen[-1].startswith(until):
            seen.append(lines.get(timeout=WAIT).rstrip("\n"))  # bounded: never hangs
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT)
        reader.join(timeout=WAIT)  # the pipe is at its end once the process is gone
        stderr.close()
    assert all("Traceback" not in line for line in seen)
    if until == "reconnecting in":
        assert "cannot reach the relay" in seen[-1], seen
        seen[-1] = until
    return seen


# --------------------------------------------------------------------------- surface


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"python -m client {client.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", client.__version__)


def test_sync_workspace_has_the_workspace_signature() -> None:
    sync = inspect.signature(SyncWorkspace.__init__).parameters
    async_ = inspect.signature(Workspace.__init__).parameters
    assert list(sync) == list(async_)
    for name, param in async_.items():
        assert (sync[name].kind, sync[name].default) == (param.kind, param.default), name
        assert sync[name].annotation == param.annotation, name


def test_every_public_property_has_a_docstring() -> None:
    missing = []
    for name in client.__all__:
        obj = getattr(client, name)
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if isinstance(value, property) and not attr.startswith("_") and not value.__doc__:
                missing.append(f"{name}.{attr}")
    assert missing == []


def test_iterating_events_after_the_with_block_ends_cleanly(
    relay: RelayProcess, ws_id: str, recwarn: pytest.WarningsRecorder
) -> None:
    with SyncWorkspace(relay.url, ws_id, KEY, **FAST) as ws:
        ws.send_many([{"n": 0}, {"n": 1}])
        live = ws.events()
        later = ws.events(live=False)  # never started inside the block
        first = next(live)
    assert isinstance(first, Event) and first.data == {"n": 0}
    assert list(live) == [] and list(later) == []
    assert ws.closed
    with pytest.raises(RuntimeError, match="closed"):
        ws.send({})
    assert [str(w.message) for w in recwarn] == []
