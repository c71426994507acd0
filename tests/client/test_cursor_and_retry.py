"""Offline pieces: the file cursor store, backoff, and how sends retry without duplicating."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from client import (
    AsyncRelayClient,
    Backoff,
    ConfigError,
    CursorState,
    FileCursorStore,
    MemoryCursorStore,
    Unauthorized,
    Workspace,
    WorkspaceKey,
)

# --------------------------------------------------------------------------- cursor stores


def test_file_store_round_trip(tmp_path: Path) -> None:
    store = FileCursorStore(tmp_path / "sub" / "cursor.json")
    assert store.load("a") is None
    store.save("a", CursorState(seq=5, relay_epoch="e1"))
    store.save("b", CursorState(seq=9))
    store.save("a", CursorState(seq=7, relay_epoch="e1"))
    reopened = FileCursorStore(tmp_path / "sub" / "cursor.json")
    assert reopened.load("a") == CursorState(seq=7, relay_epoch="e1")
    assert reopened.load("b") == CursorState(seq=9)
    assert os.listdir(tmp_path / "sub") == ["cursor.json"]  # no temp files left behind


def test_file_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cursor.json"
    store = FileCursorStore(path)
    store.save("a", CursorState(seq=1))
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save("a", CursorState(seq=2))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cursor.json"]


def test_file_store_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "cursor.json"
    path.write_text("this is not a cursor file")
    with pytest.raises(ConfigError, match="not a cursor file"):
        FileCursorStore(path).load("a")


def test_memory_store() -> None:
    store = MemoryCursorStore()
    store.save("a", CursorState(seq=3))
    assert store.load("a") == CursorState(seq=3) and store.load("b") is None


# --------------------------------------------------------------------------- backoff


def test_backoff_grows_caps_and_jitters() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.5)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0), (500, 8.0)]:
        delays = {backoff.delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
    assert Backoff(jitter=0).delay(0) == 0.25


def test_backoff_honours_retry_after() -> None:
    assert Backoff(initial=0.1, maximum=1).delay(0, retry_after=5) == 5
    assert Backoff(initial=0.1, maximum=1).delay(0, retry_after=10_000) == 300
    with pytest.raises(ValueError):
        Backoff(initial=2, maximum=1)


# --------------------------------------------------------------------------- send retries


def flaky_relay(
    failures: list[httpx.Response | Exception],
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A relay that answers each push with the next scripted failure, then succeeds."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/keyring"):
            return httpx.Response(200, json=[])  # read before the first send: no rotations
        seen.append(request)
        if failures:
            failure = failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(200, json={"seq": 42, "duplicate": len(seen) > 1})

    return httpx.MockTransport(handler), seen


FAST_RETRY = {"reconnect": Backoff(initial=0.001, maximum=0.01)}


@pytest.mark.anyio
async def test_send_retries_with_the_same_key_and_bytes() -> None:
    transport, seen = flaky_relay(
        [
            httpx.ConnectError("refused"),
            httpx.Response(503, headers={"retry-after": "0"}, json={"error": "store_unavailable"}),
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            httpx.Response(429, headers={"retry-after": "0"}, json={"error": "rate_limited"}),
        ]
    )
    client = AsyncRelayClient("http://relay.test", transport=transport)
    async with Workspace(
        "http://relay.test", "ws", WorkspaceKey.generate(), client=client, **FAST_RETRY
    ) as ws:
        assert await ws.send({"pay": 1}) == 42
    await client.aclose()
    assert len(seen) == 5
    assert len({r.headers["idempotency-key"] for r in seen}) == 1
    assert len({r.content for r in seen}) == 1


@pytest.mark.anyio
async def test_send_gives_up_after_its_attempts_and_never_retries_auth() -> None:
    transport, seen = flaky_relay([httpx.ConnectError("refused")] * 10)
    client = AsyncRelayClient("http://relay.test", transport=transport)
    ws = Workspace(
        "http://relay.test",
        "ws",
        WorkspaceKey.generate(),
        client=client,
        send_attempts=3,
        **FAST_RETRY,
    )
    with pytest.raises(Exception, match="cannot reach the relay"):
        await ws.send({})
    assert len(seen) == 3

    transport, seen = flaky_relay([httpx.Response(401, json={"error": "unauthorized"})] * 3)
    ws = Workspace(
        "http://relay.test",
        "ws",
        WorkspaceKey.generate(),
        client=AsyncRelayClient("http://relay.test", transport=transport),
        **FAST_RETRY,
    )
    with pytest.raises(Unauthorized):
        await ws.send({})
    assert len(seen) == 1


def test_two_sends_of_the_same_object_are_two_events() -> None:
    ws = Workspace("http://relay.test", "ws", WorkspaceKey.generate())
    assert ws.seal({"a": 1}) != ws.seal({"a": 1})  # fresh nonce per seal
    with pytest.raises(ValueError, match="not JSON"):
        ws.seal(b"{oops")
