"""Key rotation is adopted before sealing: a fresh process for a member never seals under
a rotated-out epoch, through the public API and the CLI, each step a separate process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Mapping

import anyio
import httpx
import pytest

from client import (
    AsyncRelayClient,
    Device,
    Event,
    Keyring,
    RelayClient,
    UnknownEpoch,
    Workspace,
    WorkspaceKey,
    open_envelope,
    parse_envelope,
)
from tests.client.support import FAST, WAIT
from tests.client.test_client_cli import cli, cli_env, run_cli
from tests.relayproc import REPO, RelayProcess

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

PASSPHRASE = "rotation adoption passphrase"


def python(code: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter: nothing carries over from this process."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=2 * WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def device_env(device: Device) -> dict[str, str]:
    return {"HIVE_DEVICE_ID": device.device_id, "HIVE_DEVICE_KEY": device.secret_hex()}


def members() -> dict[str, Device]:
    return {name: Device.generate(name) for name in ("alice", "bob", "carol")}


def keys_of(device: Device, relay: RelayProcess, ws_id: str) -> Keyring:
    """Everything `device` can hold: the passphrase key (epoch 0) plus rotations sealed to it."""
    keyring = Keyring.single(WorkspaceKey.from_passphrase(PASSPHRASE))
    with RelayClient(relay.url) as api:
        keyring.add_rotations(api.get_keyring(ws_id), device)
    return keyring


def assert_sealed_past_carol(relay: RelayProcess, ws_id: str, devices: dict[str, Device]) -> None:
    with RelayClient(relay.url) as api:
        rows = api.fetch(ws_id).rows
    assert len(rows) == 1
    body = rows[0].body
    assert json.loads(body)["version"] == 1
    assert parse_envelope(body).epoch == 1
    assert open_envelope(body, keys_of(devices["bob"], relay, ws_id)).plaintext == b'{"n":1}'
    carol = keys_of(devices["carol"], relay, ws_id)
    assert carol.epochs == (0,)
    with pytest.raises(UnknownEpoch):
        open_envelope(body, carol)


def test_a_fresh_member_process_seals_under_the_rotated_key(
    relay: RelayProcess, ws_id: str
) -> None:
    devices = members()
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": PASSPHRASE}
    # Process 1: alice rotates to {alice, bob}, removing carol.
    rotated = python(
        f"""
        import anyio
        from client import Workspace

        async def main():
            async with Workspace.from_env() as ws:
                print(await ws.rotate({{
                    "alice": "{devices["alice"].public_hex}",
                    "bob": "{devices["bob"].public_hex}",
                }}))

        anyio.run(main)
        """,
        {**env, **device_env(devices["alice"])},
    )
    assert rotated.stdout.strip() == "1"
    # Process 2: bob, who has never read the keyring, sends.
    python(
        """
        import anyio
        from client import Workspace

        async def main():
            async with Workspace.from_env() as ws:
                await ws.send({"n": 1})

        anyio.run(main)
        """,
        {**env, **device_env(devices["bob"])},
    )
    assert_sealed_past_carol(relay, ws_id, devices)


def test_the_cli_rotates_and_a_fresh_send_uses_the_new_epoch(
    relay: RelayProcess, ws_id: str
) -> None:
    devices = members()
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": PASSPHRASE}
    rotated = run_cli(
        "rotate",
        f"alice={devices['alice'].public_hex}",
        f"bob={devices['bob'].public_hex}",
        env={**env, **device_env(devices["alice"])},
    )
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.strip() == "1"
    assert rotated.stderr == ""

    sent = run_cli("send", '{"n":1}', env={**env, **device_env(devices["bob"])})
    assert sent.returncode == 0, sent.stderr
    assert_sealed_past_carol(relay, ws_id, devices)

    # Bob's tail opens it; carol's stops at the epoch she was not given.
    bob = run_cli("tail", "--once", env={**env, **device_env(devices["bob"])})
    assert (bob.returncode, json.loads(bob.stdout)["event"]) == (0, {"n": 1})
    carol = run_cli("tail", "--once", env={**env, **device_env(devices["carol"])})
    assert carol.returncode == 1 and carol.stdout == ""
    assert "key epoch 1" in carol.stderr


def test_probe_reports_the_epoch_a_member_would_seal_with(relay: RelayProcess, ws_id: str) -> None:
    devices = members()
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": PASSPHRASE}
    pairs = [f"{name}={devices[name].public_hex}" for name in ("alice", "bob")]
    assert cli("rotate", *pairs, env={**env, **device_env(devices["alice"])}).returncode == 0
    bob = cli("probe", env={**env, **device_env(devices["bob"])})
    assert bob.returncode == 0, bob.stderr
    assert "ok: new envelopes are sealed with key epoch 1" in bob.stdout
    carol = cli("probe", env={**env, **device_env(devices["carol"])})
    assert "new envelopes are sealed with key epoch 0" in carol.stdout
    assert "holds key epoch 1" in carol.stderr and "not sealed to device 'carol'" in carol.stderr


def test_rotate_command_input_errors(relay: RelayProcess, ws_id: str) -> None:
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": PASSPHRASE}
    good = Device.generate("x").public_hex
    cases = {
        "no-equals": ("alice",),
        "bad hex": ("alice=zz",),
        "short key": ("alice=abcd",),
        "empty name": (f"={good}",),
        "duplicate": (f"alice={good}", f"alice={good}"),
    }
    for label, members_args in cases.items():
        result = cli("rotate", *members_args, env=env)
        assert result.returncode == 2, label
        assert len(result.stderr.splitlines()) == 1, (label, result.stderr)
        assert "name=public-hex" in result.stderr or "twice" in result.stderr, label
    with RelayClient(relay.url) as api:
        assert api.get_keyring(ws_id) == []  # nothing was posted
    # A rotation that leaves out this device says so (it could not open what follows).
    me = Device.generate("me")
    left_out = cli("rotate", f"other={good}", env={**env, **device_env(me)})
    assert left_out.returncode == 0 and left_out.stdout.strip() == "1"
    assert "device 'me' (this one) is not among the members" in left_out.stderr


@pytest.mark.anyio
async def test_without_a_device_key_the_sdk_warns_once(
    relay: RelayProcess, ws_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    devices = members()
    async with Workspace(relay.url, ws_id, PASSPHRASE, device=devices["alice"], **FAST) as alice:
        await alice.rotate({"alice": devices["alice"].public_key})
    caplog.set_level(logging.WARNING, logger="client")
    async with Workspace(relay.url, ws_id, PASSPHRASE, **FAST) as keyless:
        await keyless.send({"n": 1})
        await keyless.send({"n": 2})
        items = [i async for i in keyless.events(live=False)]
        assert [(i.data, i.key_epoch) for i in items if isinstance(i, Event)] == [
            ({"n": 1}, 0),
            ({"n": 2}, 0),
        ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "key epoch 1" in warnings[0] and "epoch 0" in warnings[0]
    assert "HIVE_DEVICE_KEY" in warnings[0]


def test_the_cli_without_a_device_key_warns_once_on_stderr(relay: RelayProcess, ws_id: str) -> None:
    devices = members()
    env = {"HIVE_RELAY_URL": relay.url, "HIVE_WORKSPACE": ws_id, "HIVE_WORKSPACE_KEY": PASSPHRASE}
    rotate = cli("rotate", f"alice={devices['alice'].public_hex}", env=env)
    assert rotate.returncode == 0, rotate.stderr
    assert "no device key given" in rotate.stderr
    sent = run_cli("send", '{"n":1}', env=env)
    assert sent.returncode == 0, sent.stderr
    warning = sent.stderr.strip().splitlines()
    assert len(warning) == 1 and "warning:" in warning[0] and "key epoch 1" in warning[0]


def counting_relay() -> tuple[httpx.MockTransport, list[str]]:
    """Answers keyring reads with an empty keyring and pushes with a seq; records each call."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/keyring"):
            calls.append("keyring")
            return httpx.Response(200, json=[])
        calls.append("push")
        if request.url.path.endswith("/batch"):
            return httpx.Response(200, json={"seqs": [len(calls), len(calls) + 1]})
        return httpx.Response(200, json={"seq": len(calls)})

    return httpx.MockTransport(handler), calls


@pytest.mark.anyio
async def test_the_keyring_is_read_before_every_send_unless_told_otherwise() -> None:
    me = Device.generate("me")
    transport, calls = counting_relay()
    async with AsyncRelayClient("http://relay.test", transport=transport) as api:
        ws = Workspace("http://relay.test", "w", PASSPHRASE, device=me, client=api)
        await ws.send({"n": 1})
        await ws.send({"n": 2})
        assert calls == ["keyring", "push", "keyring", "push"]

        calls.clear()
        async with anyio.create_task_group() as tg:  # concurrent sends share one read
            for n in range(5):
                tg.start_soon(ws.send, {"n": n})
        assert calls.count("keyring") == 1 and calls.count("push") == 5

        calls.clear()
        relaxed = Workspace(
            "http://relay.test", "w", PASSPHRASE, device=me, client=api, keyring_refresh=3600
        )
        await relaxed.send({"n": 1})
        await relaxed.send_many([{"n": 2}, {"n": 3}])
        assert calls == ["keyring", "push", "push"]

        calls.clear()
        keyless = Workspace("http://relay.test", "w", PASSPHRASE, client=api)
        await keyless.send({"n": 1})
        await keyless.send({"n": 2})
        assert calls == ["keyring", "push", "push"]  # read once, only to check for rotations
