"""Reloading access without a restart (issue 16): real relay processes, real files, the CLI.

The allowlist, the signing-key file and the revocation file are changed on disk
while streams of the affected tokens are open; SIGHUP and the stat poll each
put the change in force; a half-written or empty file keeps the old policy and
says so (log line and metric); check-config agrees with start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from relay.access import AllowlistPolicy, Denied, OpenStreams, issue_token
from relay.reload import Reloader, ReloadError
from tests.redisproc import RedisServer, own_server_required
from tests.relayproc import REPO, RelayProcess, relay_env

WAIT = 20.0


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def status(relay: RelayProcess, token: str, ws: str = "w") -> int:
    return httpx.get(
        f"{relay.url}/v1/workspaces/{ws}/envelopes", headers=bearer(token), timeout=WAIT
    ).status_code


def wait_until(
    check: Callable[[], bool], what: str, relay: RelayProcess, timeout: float = WAIT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{relay.logs()[-4000:]}")


def metric(relay: RelayProcess, name: str, **labels: str) -> float:
    text = httpx.get(relay.url + "/metrics", timeout=WAIT).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


class SSE:
    """An SSE stream read in the background: its text so far, and whether it ended."""

    def __init__(self, relay: RelayProcess, token: str, ws: str = "w", bodies: bool = True) -> None:
        self.url = f"{relay.url}/v1/workspaces/{ws}/events" + ("?bodies=1" if bodies else "")
        self.token = token
        self.text = ""
        self.ended = asyncio.Event()
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as c,
            c.stream("GET", self.url, headers=bearer(self.token)) as r,
        ):
            assert r.status_code == 200, await r.aread()
            async for chunk in r.aiter_text():
                self.text += chunk
                if ": connected" in self.text:
                    self.connected.set()
        self.ended.set()

    async def __aenter__(self) -> SSE:
        self.task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), WAIT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.task.done() and not self.task.cancelled() and self.task.exception():
            raise self.task.exception()  # type: ignore[misc]


async def ws_open(relay: RelayProcess, token: str, ws: str = "w") -> websockets.ClientConnection:
    sock = await websockets.connect(
        f"ws://127.0.0.1:{relay.port}/v1/workspaces/{ws}/ws", additional_headers=bearer(token)
    )
    await sock.send(json.dumps({"op": "sub", "after": 0}))
    return sock


async def ws_closed(sock: websockets.ClientConnection) -> tuple[int | None, str]:
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(sock.recv(), WAIT)
    return sock.close_code, sock.close_reason or ""


async def post(relay: RelayProcess, token: str, body: dict[str, object], ws: str = "w") -> int:
    async with httpx.AsyncClient(timeout=WAIT) as c:
        r = await c.post(
            f"{relay.url}/v1/workspaces/{ws}/envelopes", json=body, headers=bearer(token)
        )
        assert r.status_code == 200, r.text
        return int(r.json()["seq"])


async def long_poll(relay: RelayProcess, token: str, ws: str = "w") -> httpx.Response:
    async with httpx.AsyncClient(timeout=WAIT + 60) as c:
        return await c.get(
            f"{relay.url}/v1/workspaces/{ws}/envelopes",
            params={"after": 10**6, "wait": 60},
            headers=bearer(token),
        )


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_stream_checked_before_a_reload_but_held_after_it_is_checked_again() -> None:
    # A WebSocket or long-poll awaits the store between its token check and `hold`:
    # a reload in between must not leave it open with a token no longer accepted.
    streams = OpenStreams()
    ended: list[Denied] = []
    checked = streams.generation
    assert streams.recheck(AllowlistPolicy(["tok-a"])) == 0
    with streams.hold("tok-b", "w", ended.append, checked):
        assert [d.status for d in ended] == [401]
        assert len(streams) == 0
    with (
        streams.hold("tok-a", "w", ended.append, checked),
        streams.hold("tok-b", "w", ended.append, streams.generation),
    ):
        assert len(ended) == 1 and len(streams) == 2  # accepted, or checked under this policy
        assert streams.recheck(AllowlistPolicy(["tok-a"])) == 1
        assert len(ended) == 2 and len(streams) == 1


def test_the_reloader_registry_serves_any_item(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The generic seam other reloadable things (the TLS certificate) register with.
    path = tmp_path / "item"
    path.write_text("1\n")
    applied: list[int] = []

    def load() -> int:
        text = path.read_text()
        if not text.strip().isdigit():
            raise ReloadError(f"{str(path)!r} holds no number")
        return int(text)

    def apply(value: int) -> str:
        if value == 13:
            raise RuntimeError("a bug in apply")
        applied.append(value)
        return f"now {value}"

    reloader = Reloader(interval=0)
    reloader.watch("number", [str(path)], load, apply)

    async def scenario() -> None:
        assert await reloader.poll() == []  # unchanged since watch()
        path.write_text("2\n")
        assert await reloader.poll() == ["number"] and applied == [2]
        path.write_text("oops\n")
        assert await reloader.poll() == ["number"] and applied == [2]
        assert await reloader.poll() == []  # the same bad file is not read again
        assert await reloader.reload(None, "SIGHUP") == {"number": False}  # a SIGHUP does
        path.write_text("13\n")
        assert await reloader.poll() == ["number"] and applied == [2]  # apply failed: logged
        path.write_text("3\n")
        assert await reloader.poll() == ["number"] and applied == [2, 3]

    with caplog.at_level("INFO", logger="relay.reload"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert "reloaded number (file change): now 2" in messages
    failures = [m for m in messages if m.startswith("reload of number failed")]
    assert len(failures) == 3, messages
    assert "holds no number" in failures[0] and "(SIGHUP)" in failures[1]
    assert any("applying it failed" in m for m in messages)
    text = "".join(
        f"{s.name}{sorted(s.labels.items())}{s.value}\n"
        for m in reloader.collect()
        for s in m.samples
    )
    assert "hive_relay_reload_total[('item', 'number'), ('result', 'ok')]2" in text
    assert "hive_relay_reload_total[('item', 'number'), ('result', 'failed')]3" in text
    assert "hive_relay_reload_failing[('item', 'number')]0.0" in text


def test_a_file_still_being_written_is_read_once_it_holds_still(tmp_path: Path) -> None:
    path = tmp_path / "item"
    path.write_text("a\n")
    loads: list[str] = []

    class Writing(Reloader):
        writes = ["a\nb", "a\nb\nc"]  # the writer is not done when the poll looks

        async def settle(self) -> None:
            if self.writes:
                path.write_text(self.writes.pop(0))

    reloader = Writing(interval=0)
    reloader.watch("item", [str(path)], path.read_text, lambda text: loads.append(text) or "ok")

    async def scenario() -> None:
        path.write_text("a\n")
        os.utime(path, ns=(1, 1))  # a change the poll notices
        assert await reloader.poll() == []  # changed again while settling: not read
        assert await reloader.poll() == []
        assert await reloader.poll() == ["item"]  # held still: read, whole
        assert loads == ["a\nb\nc"]

    asyncio.run(scenario())


# --------------------------------------------------------------- the allowlist
def allowlist_relay(tmp_path: Path, tokens: list[str], interval: str) -> tuple[RelayProcess, Path]:
    path = tmp_path / "tokens"
    path.write_text("# members\n" + "".join(t + "\n" for t in tokens))
    relay = RelayProcess(
        env={
            "HIVE_RELAY_ACCESS_TOKENS_FILE": str(path),
            "HIVE_RELAY_RELOAD_INTERVAL": interval,
            "HIVE_RELAY_KEEPALIVE_SECS": "1",
        }
    )
    return relay, path


@pytest.mark.slow
def test_allowlist_reload_by_sighup_ends_only_the_removed_tokens_streams(tmp_path: Path) -> None:
    # Interval 0: no poll, so only the SIGHUP can have put the change in force.
    relay, path = allowlist_relay(tmp_path, ["tok-alice", "tok-bob"], "0")
    with relay:
        assert status(relay, "tok-carol") == 401

        async def scenario() -> None:
            async with SSE(relay, "tok-alice") as alice, SSE(relay, "tok-bob") as bob:
                bob_ws = await ws_open(relay, "tok-bob")
                alice_ws = await ws_open(relay, "tok-alice")
                bob_poll = asyncio.get_running_loop().create_task(long_poll(relay, "tok-bob"))
                await asyncio.sleep(0.5)  # the long-poll is waiting
                write_atomically(path, "tok-alice\ntok-carol\n")
                await asyncio.sleep(0.5)
                assert status(relay, "tok-carol") == 401  # not yet: no poll, no SIGHUP
                relay.send_signal(signal.SIGHUP)
                await asyncio.wait_for(bob.ended.wait(), 5)
                assert "event: revoked\n" in bob.text, bob.text
                assert '"error":"unauthorized"' in bob.text
                assert "not accepted" in bob.text
                assert await asyncio.wait_for(ws_closed(bob_ws), 5) == (
                    1008,
                    "token no longer accepted",
                )
                answer = await asyncio.wait_for(bob_poll, 5)
                assert answer.status_code == 401, answer.text
                assert answer.headers["www-authenticate"] == "Bearer"
                # Alice's streams are untouched and still deliver.
                seq = await post(relay, "tok-alice", {"after": "reload"})
                await until(lambda: f"id: {seq}\n" in alice.text, "alice's SSE delivery")
                assert not alice.ended.is_set()
                frame = json.loads(await asyncio.wait_for(alice_ws.recv(), WAIT))
                assert frame["op"] == "env" and frame["seq"] == seq
                await alice_ws.close()

        asyncio.run(scenario())
        assert status(relay, "tok-carol") == 200
        assert status(relay, "tok-bob") == 401
        logs = relay.logs()
        assert "reloaded access_tokens_file (SIGHUP): access allowlist (2 token(s)); 3 live" in logs
        assert metric(relay, "hive_relay_reload_total", item="access_tokens_file", result="ok") == 1
        assert metric(relay, "hive_relay_streams_ended_by_reload_total") == 3
        assert "tok-" not in logs  # tokens are never logged
    assert relay.proc is not None and relay.proc.returncode == 0


@pytest.mark.slow
def test_allowlist_change_on_disk_is_picked_up_without_a_signal(tmp_path: Path) -> None:
    relay, path = allowlist_relay(tmp_path, ["tok-a"], "0.2")
    with relay:
        with path.open("a") as f:  # appended in place: same inode, new size and mtime
            f.write("tok-b\n")
        wait_until(lambda: status(relay, "tok-b") == 200, "tok-b accepted", relay, timeout=10)
        write_atomically(path, "tok-b\n")  # replaced by rename: a new inode
        wait_until(lambda: status(relay, "tok-a") == 401, "tok-a refused", relay, timeout=10)
        assert status(relay, "tok-b") == 200
        assert "reloaded access_tokens_file (file change)" in relay.logs()
        assert metric(relay, "hive_relay_reload_total", item="access_tokens_file", result="ok") == 2


@pytest.mark.slow
def test_empty_half_written_or_missing_allowlist_keeps_the_old_policy(tmp_path: Path) -> None:
    relay, path = allowlist_relay(tmp_path, ["tok-a", "tok-b"], "0.2")
    with relay:

        def failures() -> float:
            return metric(
                relay, "hive_relay_reload_total", item="access_tokens_file", result="failed"
            )

        async def scenario() -> None:
            async with SSE(relay, "tok-a") as stream:
                cases = [
                    (lambda: path.write_text(""), "holds no token"),
                    (lambda: path.write_text("# all comments\n\n"), "holds no token"),
                    (lambda: path.write_text("tok-a\ntok-"), "looks half-written"),
                    (path.unlink, "No such file or directory"),
                    (lambda: path.write_bytes(b"tok-a\n\xff\xfe\n"), "cannot read"),
                ]
                for n, (damage, reason) in enumerate(cases, 1):
                    damage()
                    await until(lambda n=n: failures() == n, f"failure {n} ({reason})")
                    assert (
                        metric(relay, "hive_relay_reload_failing", item="access_tokens_file") == 1
                    )
                    assert status(relay, "tok-a") == 200 and status(relay, "tok-b") == 200
                    lines = [
                        line
                        for line in relay.logs().splitlines()
                        if "reload of access_tokens_file failed" in line
                    ]
                    assert len(lines) == n and reason in lines[-1], lines
                    assert "keeping the previous one" in lines[-1]
                await asyncio.sleep(1)  # several polls of the same bad file: no new line
                assert failures() == len(cases)
                assert not stream.ended.is_set()  # the stream never noticed
                path.write_text("tok-a\n")
                await until(lambda: status(relay, "tok-b") == 401, "the good file in force")
                assert not stream.ended.is_set()
                assert metric(relay, "hive_relay_reload_failing", item="access_tokens_file") == 0

        asyncio.run(scenario())
        assert (
            metric(
                relay, "hive_relay_reload_last_success_timestamp_seconds", item="access_tokens_file"
            )
            > time.time() - 30
        )


# ------------------------------------------------------------ signed tokens
def keypair() -> tuple[bytes, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return private, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@pytest.mark.slow
def test_signing_key_rotation_by_file(tmp_path: Path) -> None:
    env_private, env_public = keypair()  # the single-key setting keeps working beside the file
    old_private, old_public = keypair()
    new_private, new_public = keypair()
    keys = tmp_path / "keys"
    keys.write_text(f"# the old key\n{old_public}\n")
    relay = RelayProcess(
        env={
            "HIVE_RELAY_TOKEN_PUBKEY": env_public,
            "HIVE_RELAY_TOKEN_PUBKEY_FILE": str(keys),
            "HIVE_RELAY_RELOAD_INTERVAL": "0.2",
            "HIVE_RELAY_KEEPALIVE_SECS": "1",
        }
    )
    by_env = issue_token(env_private, "ops")
    old = issue_token(old_private, "alice")
    new = issue_token(new_private, "alice")
    with relay:
        assert (status(relay, by_env), status(relay, old), status(relay, new)) == (200, 200, 401)
        write_atomically(keys, f"{old_public}\n{new_public}  # added for the rotation\n")
        wait_until(lambda: status(relay, new) == 200, "the new key accepted", relay)
        assert status(relay, old) == 200  # both while both are listed

        async def scenario() -> None:
            async with SSE(relay, old) as old_stream, SSE(relay, new) as new_stream:
                old_ws = await ws_open(relay, old)
                write_atomically(keys, f"{new_public}\n")
                await asyncio.wait_for(old_stream.ended.wait(), 10)
                assert "event: revoked\n" in old_stream.text
                assert "signature does not verify" in old_stream.text
                assert await asyncio.wait_for(ws_closed(old_ws), 5) == (
                    1008,
                    "token no longer accepted",
                )
                seq = await post(relay, new, {"n": 1})
                await until(lambda: f"id: {seq}\n" in new_stream.text, "new-key delivery")
                assert not new_stream.ended.is_set()

        asyncio.run(scenario())
        assert (status(relay, by_env), status(relay, old), status(relay, new)) == (200, 401, 200)
        # A key file with a broken line is refused whole: the new key stays in force.
        keys.write_text(f"{new_public}\nnot-a-key\n")
        wait_until(
            lambda: "reload of token_pubkey_file failed" in relay.logs(), "the refusal", relay
        )
        assert "line 2" in relay.logs()
        assert status(relay, new) == 200


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=REPO,
        env=relay_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def issued(key_file: Path, sub: str) -> tuple[str, str]:
    """(token, jti) from `python -m relay token issue`."""
    out = cli("token", "issue", "--key", f"@{key_file}", "--sub", sub)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "\n" not in token  # stdout holds the token alone
    m = re.search(r"token id \(jti, for `token revoke`\): (\S+)", out.stderr)
    assert m, out.stderr
    claims = json.loads(
        __import__("relay.access", fromlist=["b64url_decode"]).b64url_decode(token.split(".")[1])
    )
    assert claims["jti"] == m.group(1)
    return token, m.group(1)


@pytest.mark.slow
def test_revocation_by_jti_and_by_subject_through_the_cli(tmp_path: Path) -> None:
    private, public = keypair()
    key_file = tmp_path / "signing.key"
    key_file.write_text(private.hex())
    revoked = tmp_path / "revoked"
    revoked.write_text("")
    alice, alice_jti = issued(key_file, "alice")
    alice2, _ = issued(key_file, "alice")
    bob1, _ = issued(key_file, "bob")
    bob2, _ = issued(key_file, "bob")
    carol, _ = issued(key_file, "carol")
    assert len({alice, alice2}) == 2  # the same subject and claims, yet a unique jti each
    relay = RelayProcess(
        env={
            "HIVE_RELAY_TOKEN_PUBKEY": public,
            "HIVE_RELAY_REVOKED_TOKENS_FILE": str(revoked),
            "HIVE_RELAY_RELOAD_INTERVAL": "0.2",
            "HIVE_RELAY_KEEPALIVE_SECS": "1",
        }
    )
    env = {"HIVE_RELAY_REVOKED_TOKENS_FILE": str(revoked)}
    with relay:

        async def scenario() -> None:
            async with (
                SSE(relay, alice) as alice_sse,
                SSE(relay, alice2) as alice2_sse,
                SSE(relay, carol, bodies=False) as carol_sse,
            ):
                bob_ws = await ws_open(relay, bob1)
                bob2_ws = await ws_open(relay, bob2)
                out = cli("token", "revoke", alice_jti, "--note", "lost laptop", env=env)
                assert out.returncode == 0, out.stderr
                await asyncio.wait_for(alice_sse.ended.wait(), 10)
                assert "event: revoked\n" in alice_sse.text
                assert '"error":"token_revoked"' in alice_sse.text
                assert not alice2_sse.ended.is_set()  # the same subject, another jti
                out = cli("token", "revoke", "sub:bob", env=env)
                assert out.returncode == 0, out.stderr
                for sock in (bob_ws, bob2_ws):
                    assert await asyncio.wait_for(ws_closed(sock), 10) == (1008, "token revoked")
                seq = await post(relay, carol, {"still": "here"})
                await until(lambda: f'"seq":{seq}' in carol_sse.text, "carol's nudge")
                assert not alice2_sse.ended.is_set() and not carol_sse.ended.is_set()

        asyncio.run(scenario())
        for token in (alice, bob1, bob2):
            r = httpx.get(relay.url + "/v1/workspaces/w/envelopes", headers=bearer(token))
            assert r.status_code == 401
            assert r.json() == {
                "error": "token_revoked",
                "message": "the bearer token has been revoked",
            }
        assert status(relay, alice2) == 200 and status(relay, carol) == 200
        text = revoked.read_text()
        assert re.fullmatch(
            rf"{alice_jti}  # revoked \S+Z lost laptop\nsub:bob  # revoked \S+Z\n", text
        ), text
        assert (
            metric(relay, "hive_relay_reload_total", item="revoked_tokens_file", result="ok") == 2
        )


@pytest.mark.slow
def test_token_revoke_checks_its_input_and_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    env = {"HIVE_RELAY_REVOKED_TOKENS_FILE": str(path)}
    for bad in ("", "two words", "#x", "sub:"):
        out = cli("token", "revoke", bad, env=env)
        assert out.returncode == 2 and "token revoke:" in out.stderr, (bad, out.stderr)
    out = cli("token", "revoke", "abc")
    assert out.returncode == 2 and "HIVE_RELAY_REVOKED_TOKENS_FILE" in out.stderr
    assert not path.exists()
    path.write_text("hand-edited")  # no last newline: the next entry must not join it
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "relay", "token", "revoke", f"jti-{n}"],
            cwd=REPO,
            env=relay_env(env),
            stderr=subprocess.PIPE,
        )
        for n in range(8)
    ]
    assert all(p.wait(60) == 0 for p in procs)
    lines = path.read_text().splitlines()
    assert lines[0] == "hand-edited"
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(f"jti-{n}" for n in range(8))
    assert path.read_text().endswith("\n")


# ------------------------------------------------------------ workers
@pytest.mark.slow
def test_supervisor_passes_sighup_to_every_worker(tmp_path: Path) -> None:
    own_server_required()
    path = tmp_path / "tokens"
    path.write_text("tok-a\n")
    with RedisServer() as server:
        relay = RelayProcess(
            env={
                "HIVE_RELAY_STORE": server.url,
                "HIVE_RELAY_WORKERS": "2",
                "HIVE_RELAY_ACCESS_TOKENS_FILE": str(path),
                "HIVE_RELAY_RELOAD_INTERVAL": "0",  # the signal alone
            }
        )
        with relay:

            def reloads_by_worker() -> dict[int, float]:
                seen: dict[int, float] = {}
                for _ in range(60):
                    text = httpx.get(relay.url + "/metrics", timeout=WAIT).text
                    pid = int(float(re.search(r"^hive_relay_worker_pid (\S+)", text, re.M)[1]))  # type: ignore[index]
                    m = re.search(
                        r'^hive_relay_reload_total\{item="access_tokens_file",result="ok"\} (\S+)',
                        text,
                        re.M,
                    )
                    seen[pid] = float(m[1]) if m else 0.0
                    if len(seen) == 2:
                        break
                return seen

            assert sorted(reloads_by_worker().values()) == [0.0, 0.0]
            write_atomically(path, "tok-a\ntok-b\n")
            relay.send_signal(signal.SIGHUP)
            wait_until(
                lambda: relay.logs().count("reloaded access_tokens_file (SIGHUP)") == 2,
                "both workers reloaded",
                relay,
            )
            counts = reloads_by_worker()
            assert len(counts) == 2 and sorted(counts.values()) == [1.0, 1.0], counts
            for _ in range(20):  # whichever worker answers
                assert status(relay, "tok-b") == 200
            assert relay.proc is not None and relay.proc.poll() is None  # the supervisor lives
            assert "signal SIGHUP: asking 2 workers to reload" in relay.logs()
            assert relay.stop(signal.SIGTERM) == 0, relay.logs()


# ------------------------------------------------------------ check-config
@pytest.mark.slow
def test_check_config_accepts_a_good_configuration_and_shows_no_secrets(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("file-token-secret-1\n")
    env = {
        "HIVE_RELAY_ACCESS_TOKENS": "env-token-secret-2,env-token-secret-3",
        "HIVE_RELAY_ACCESS_TOKENS_FILE": str(tokens),
        "HIVE_RELAY_METRICS_TOKEN": "metrics-secret-4",
        "HIVE_RELAY_STORE": "redis://user:redis-secret-5@127.0.0.1:1/0",
        "HIVE_RELAY_MAX_SSE": "500",
    }
    out = cli("check-config", "--push-rate", "7", env=env)
    assert out.returncode == 0, out.stderr
    assert "secret" not in out.stdout + out.stderr
    assert re.search(r"^HIVE_RELAY_MAX_SSE +500 +env$", out.stdout, re.M)
    assert re.search(r"^HIVE_RELAY_PUSH_RATE +7.0 +flag$", out.stdout, re.M)
    assert re.search(r"^HIVE_RELAY_BACKLOG +2048 +default$", out.stdout, re.M)
    assert re.search(
        r"^HIVE_RELAY_ACCESS_TOKENS +set \(2 token\(s\), not shown\)", out.stdout, re.M
    )
    assert "redis://***@127.0.0.1:1/0" in out.stdout
    assert "access: allowlist (3 token(s))" in out.stdout
    assert "configuration OK" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HIVE_RELAY_ACCESS_TOKENS_FILE": "{tmp}/missing"}, "cannot read"),
        ({"HIVE_RELAY_ACCESS_TOKENS_FILE": "{tmp}/empty"}, "holds no token"),
        ({"HIVE_RELAY_TOKEN_PUBKEY_FILE": "{tmp}/badkeys"}, "line 1: not a 32-byte"),
        ({"HIVE_RELAY_TOKEN_PUBKEY_FILE": "{tmp}/empty"}, "holds no public key"),
        (
            {"HIVE_RELAY_TOKEN_PUBKEY": "{key}", "HIVE_RELAY_REVOKED_TOKENS_FILE": "{tmp}/badrev"},
            "line 2: not a token id",
        ),
        (
            {"HIVE_RELAY_TOKEN_PUBKEY": "{key}", "HIVE_RELAY_REVOKED_TOKENS_FILE": "{tmp}/missing"},
            "cannot read",
        ),
        ({"HIVE_RELAY_MAX_SSE": "lots"}, "HIVE_RELAY_MAX_SSE: cannot parse"),
        ({"HIVE_RELAY_RELOAD_INTERVAL": "-1"}, "below the minimum"),
        ({"HIVE_RELAY_DATA_DIR": "{tmp}/empty/sub"}, "is not a writable directory"),
        (
            {"HIVE_RELAY_TLS_CERT": "{tmp}/badrev", "HIVE_RELAY_TLS_KEY": "{tmp}/badrev"},
            "HIVE_RELAY_TLS_CERT:",
        ),
        ({"HIVE_RELAY_TLS_CERT": "{tmp}/badrev"}, "HIVE_RELAY_TLS_KEY"),
    ],
)
def test_check_config_refuses_what_start_up_refuses_with_the_same_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    (tmp_path / "empty").write_text("# nothing\n")
    (tmp_path / "badkeys").write_text("zz\n")
    (tmp_path / "badrev").write_text("ok-jti\ntwo words\n")
    _, public = keypair()
    env = {k: v.format(tmp=tmp_path, key=public) for k, v in env.items()}
    checked = cli("check-config", env=env)
    started = cli(env={**env, "HIVE_RELAY_ADDR": "127.0.0.1:0"})
    assert checked.returncode == 2, checked
    assert message in checked.stderr, checked.stderr
    assert started.returncode in (1, 2), started
    assert checked.stderr.strip().splitlines()[-1] in started.stderr + started.stdout


@pytest.mark.slow
def test_check_config_loads_the_tls_pair_and_names_the_certificate(tmp_path: Path) -> None:
    from tests.certs import TestCA

    TestCA().issue("relay.example.test").write(tmp_path / "cert.pem", tmp_path / "key.pem")
    env = {
        "HIVE_RELAY_TLS_CERT": str(tmp_path / "cert.pem"),
        "HIVE_RELAY_TLS_KEY": str(tmp_path / "key.pem"),
    }
    out = cli("check-config", env=env)
    assert out.returncode == 0, out.stderr
    assert "TLS: serving relay.example.test, expires" in out.stdout + out.stderr
    assert "configuration OK" in out.stderr
