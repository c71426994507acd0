"""HIVE_RELAY_WORKERS: N relay processes behind one port, sharing a private Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import websockets

from relay.settings import Settings, SettingsError
from tests.redisproc import RedisServer, own_server_required
from tests.relayproc import REPO, RelayProcess, relay_env


def test_workers_bounds_and_memory_store_refused() -> None:
    for bad in ("0", "-1", "65"):
        with pytest.raises(SettingsError, match="HIVE_RELAY_WORKERS"):
            Settings.load([], {"HIVE_RELAY_WORKERS": bad, "HIVE_RELAY_STORE": "redis://x:1"})
    with pytest.raises(SettingsError, match="need a shared store"):
        Settings.load([], {"HIVE_RELAY_WORKERS": "2"})
    assert Settings.load([], {"HIVE_RELAY_WORKERS": "1"}).workers == 1


def test_memory_store_with_two_workers_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay"],
        cwd=REPO,
        env=relay_env({"HIVE_RELAY_WORKERS": "2"}),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    assert b"need a shared store" in proc.stderr


def worker_pid(url: str) -> int:
    return pid_in(httpx.get(url + "/metrics", timeout=5).text)


def pid_in(text: str) -> int:
    m = re.search(r"^hive_relay_worker_pid (\d+)", text, re.M)
    assert m, text
    return int(float(m.group(1)))


async def pinned_client(url: str, not_pid: int | None = None) -> tuple[httpx.AsyncClient, int]:
    """A client with one kept-alive connection, and the pid of the worker holding it."""
    for _ in range(200):
        c = httpx.AsyncClient(base_url=url, timeout=15, limits=httpx.Limits(max_connections=1))
        r = await c.get("/metrics")
        pid = pid_in(r.text)
        if pid != not_pid:
            return c, pid
        await c.aclose()
    raise AssertionError("every connection landed on one worker")


async def cross_worker_stream_then_sigterm(relay: RelayProcess) -> None:
    pub, pub_pid = await pinned_client(relay.url)
    sub, sub_pid = await pinned_client(relay.url, not_pid=pub_pid)
    assert sub_pid != pub_pid
    async with (
        sub.stream("GET", "/v1/workspaces/xw/events", params={"bodies": "1"}) as s,
        websockets.connect(f"ws://127.0.0.1:{relay.port}/v1/workspaces/xw/ws") as sock,
    ):
        lines = s.aiter_lines()
        assert (await anext(lines)).startswith(": connected")
        r = await pub.post("/v1/workspaces/xw/envelopes", json={"via": pub_pid})
        assert r.status_code == 200, r.text
        async for line in lines:
            if line.startswith("data:"):
                assert str(pub_pid) in line
                break
        relay.send_signal(signal.SIGTERM)
        async for _ in lines:  # ends: the worker closes the stream cleanly
            pass
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(sock.recv(), 15)
        assert (sock.close_code, sock.close_reason) == (1001, "relay shutting down")
    await pub.aclose()
    await sub.aclose()


@pytest.mark.slow
def test_two_workers_share_port_replace_dead_and_stop_cleanly() -> None:
    own_server_required()
    with RedisServer() as server:
        relay = RelayProcess(
            env={
                "HIVE_RELAY_STORE": server.url,
                "HIVE_RELAY_WORKERS": "2",
                "HIVE_RELAY_LOG_LEVEL": "info",
            }
        )
        with relay:
            pids: set[int] = set()
            deadline = time.monotonic() + 30
            while len(pids) < 2 and time.monotonic() < deadline:
                pids.add(worker_pid(relay.url))
            assert len(pids) == 2, relay.logs()
            assert "2 workers" in relay.logs()
            status = httpx.get(relay.url + "/", timeout=5).text
            assert "<th>Workers</th><td>2 (this page from one of them)</td>" in status
            victim = min(pids)
            os.kill(victim, signal.SIGKILL)
            seen: set[int] = set()
            deadline = time.monotonic() + 30
            while (len(seen) < 2 or victim in seen) and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    seen.add(worker_pid(relay.url))
                if len(seen) >= 2 and victim not in seen:
                    break
            assert victim not in seen and len(seen - {victim}) == 2, relay.logs()
            assert f"worker pid {victim} exited" in relay.logs()
            asyncio.run(cross_worker_stream_then_sigterm(relay))
            assert relay.stop(signal.SIGTERM) == 0, relay.logs()
            assert "all workers stopped" in relay.logs()
