"""Process-level behaviour: ordering under concurrency, graceful shutdown with open
streams, snapshots (restore fidelity, crash safety, corrupt files), epochs."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from relay.store.snapshot import FILENAME, read_snapshot
from tests.relayproc import RelayProcess, assert_quiet_log

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

WAIT = 20.0


async def _sse_subscriber(url: str, seen: list[int], done: asyncio.Event, reconnect_after: int):
    """Follow with bodies; drop the connection once after `reconnect_after` rows."""
    last: str | None = None
    dropped = False
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as c:
        while not done.is_set():
            headers = {"Last-Event-ID": last} if last else {}
            query = "" if last else "&after=0"
            async with aconnect_sse(c, "GET", url + query, headers=headers) as es:
                async for ev in es.aiter_sse():
                    seen.append(int(ev.id))
                    last = ev.id
                    if not dropped and len(seen) >= reconnect_after:
                        dropped = True
                        break
                    if done.is_set():
                        return


async def _ws_subscriber(url: str, seen: list[int], done: asyncio.Event) -> None:
    async with websockets.connect(url) as sock:
        await sock.send(json.dumps({"op": "sub", "after": 0}))
        while not done.is_set():
            try:
                frame = json.loads(await asyncio.wait_for(sock.recv(), 0.5))
            except TimeoutError:
                continue
            if frame["op"] == "env":
                seen.append(frame["seq"])


async def _long_poller(base: str, seen: list[int], done: asyncio.Event) -> None:
    cursor = 0
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        while not done.is_set():
            r = await c.get(f"/v1/workspaces/conc/envelopes?after={cursor}&wait=1")
            rows = r.json()
            seen.extend(row["seq"] for row in rows)
            if rows:
                cursor = rows[-1]["seq"]


async def _http_publisher(base: str, n: int, tag: int, acked: list[int]) -> None:
    async with httpx.AsyncClient(base_url=base) as c:
        for i in range(n):
            r = await c.post("/v1/workspaces/conc/envelopes", json={"p": tag, "i": i})
            acked.append(r.json()["seq"])


async def _ws_publisher(url: str, n: int, tag: int, acked: list[int]) -> None:
    async with websockets.connect(url) as sock:
        for i in range(n):
            await sock.send(json.dumps({"op": "pub", "body": {"w": tag, "i": i}}))
        while len([a for a in acked if a]) < n:
            frame = json.loads(await sock.recv())
            if frame["op"] == "ack":
                acked.append(frame["seq"])
            if len(acked) == n:
                return


def test_every_subscriber_sees_every_acknowledged_seq_once_in_order() -> None:
    with RelayProcess(env={"HIVE_RELAY_PUSH_RATE": "0"}) as relay:
        base = relay.url
        ws_url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/conc/ws"
        sse_url = base + "/v1/workspaces/conc/events?bodies=1"

        async def scenario() -> tuple[list[int], list[list[int]]]:
            done = asyncio.Event()
            streams: list[list[int]] = [[] for _ in range(5)]
            subs = [
                asyncio.create_task(_sse_subscriber(sse_url, streams[0], done, 25)),
                asyncio.create_task(_sse_subscriber(sse_url, streams[1], done, 70)),
                asyncio.create_task(_sse_subscriber(sse_url, streams[2], done, 10**9)),
                asyncio.create_task(_ws_subscriber(ws_url, streams[3], done)),
                asyncio.create_task(_long_poller(base, streams[4], done)),
            ]
            await asyncio.sleep(0.5)
            acks: list[list[int]] = [[] for _ in range(5)]
            pubs = [_http_publisher(base, 40, t, acks[t]) for t in range(3)]
            pubs += [_ws_publisher(ws_url, 40, t, acks[t]) for t in (3, 4)]
            await asyncio.wait_for(asyncio.gather(*pubs), WAIT)
            acked = sorted(s for a in acks for s in a)
            async with asyncio.timeout(WAIT):
                while any(len(s) < len(acked) for s in streams):
                    await asyncio.sleep(0.05)
            done.set()
            for t in subs:
                t.cancel()
            await asyncio.gather(*subs, return_exceptions=True)
            return acked, streams

        acked, streams = asyncio.run(scenario())
        assert len(acked) == 200 and len(set(acked)) == 200
        for seen in streams:
            assert seen[: len(acked)] == acked


def _snapshot_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {"HIVE_RELAY_DATA_DIR": str(tmp), "HIVE_RELAY_PUSH_RATE": "0", **extra}


def test_sigterm_closes_streams_writes_snapshot_and_exits_zero(tmp_path: Path) -> None:
    relay = RelayProcess(env=_snapshot_env(tmp_path)).start()
    c = httpx.Client(base_url=relay.url)
    seqs = [c.post("/v1/workspaces/term/envelopes", json={"i": i}).json()["seq"] for i in range(5)]
    c.post("/v1/workspaces/term/keyring", json={"version": 1})
    c.post("/v1/workspaces/term/presence", json={"device_id": "d", "data": {"on": True}})
    c.post("/v1/workspaces/term/candidates", json={"device_id": "d", "data": [1]})
    code = c.post("/v1/pair", json={"payload": "p"}).json()["code"]
    epoch = c.get("/v1/workspaces/term/envelopes").headers["x-relay-epoch"]

    async def streams_see_the_end() -> tuple[bytes, tuple[int, str]]:
        async with httpx.AsyncClient(base_url=relay.url, timeout=WAIT) as ac:
            async with (
                ac.stream("GET", "/v1/workspaces/term/events") as s,
                websockets.connect(f"ws://127.0.0.1:{relay.port}/v1/workspaces/term/ws") as sock,
            ):
                await asyncio.sleep(0.3)
                relay.send_signal(signal.SIGTERM)
                body = b""
                async for chunk in s.aiter_raw():  # ends: the stream closes cleanly
                    body += chunk
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(sock.recv(), WAIT)
                assert sock.close_code is not None and sock.close_reason is not None
                return body, (sock.close_code, sock.close_reason)

    body, (close_code, reason) = asyncio.run(streams_see_the_end())
    assert body.startswith(b": connected\n\n")
    assert (close_code, reason) == (1001, "relay shutting down")
    assert relay.stop() == 0
    assert (tmp_path / FILENAME).exists()
    assert "wrote the shutdown snapshot" in relay.logs()
    assert_quiet_log(relay.logs())

    with RelayProcess(env=_snapshot_env(tmp_path)) as again:
        c2 = httpx.Client(base_url=again.url)
        r = c2.get("/v1/workspaces/term/envelopes")
        assert [row["seq"] for row in r.json()] == seqs
        assert r.headers["x-relay-epoch"] == epoch  # a clean stop keeps the epoch
        assert c2.get("/v1/workspaces/term/keyring").json() == [{"version": 1}]
        assert c2.get("/v1/workspaces/term/presence").json() == {"d": {"on": True}}
        assert c2.get("/v1/workspaces/term/candidates").json() == {"d": [1]}
        assert c2.get(f"/v1/pair/{code}").json() == {"payload": "p"}
        # Dedup keys survive too: re-pushing an old body is a duplicate.
        again_push = c2.post("/v1/workspaces/term/envelopes", json={"i": 0}).json()
        assert again_push == {"seq": seqs[0], "duplicate": True}
        new = c2.post("/v1/workspaces/term/envelopes", json={"i": 99}).json()["seq"]
        assert new > seqs[-1]


def test_kill_9_changes_epoch_and_never_rewinds_seqs(tmp_path: Path) -> None:
    # everysec may lose the last second of acknowledged envelopes on a machine
    # crash, so any unclean stop changes the epoch (tests/test_journal_process.py
    # has `always`, the default, which keeps it).
    env = _snapshot_env(tmp_path, HIVE_RELAY_SNAPSHOT_INTERVAL="1", HIVE_RELAY_FSYNC="everysec")
    relay = RelayProcess(env=env).start()
    c = httpx.Client(base_url=relay.url)
    first = c.post("/v1/workspaces/k9/envelopes", json={"i": 0}).json()["seq"]
    epoch = c.get("/v1/workspaces/k9/envelopes").headers["x-relay-epoch"]
    deadline = time.monotonic() + WAIT
    while not (tmp_path / FILENAME).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    last = c.post("/v1/workspaces/k9/envelopes", json={"i": 1}).json()["seq"]
    relay.stop(signal.SIGKILL)
    with RelayProcess(env=env) as again:
        r = httpx.get(again.url + "/v1/workspaces/k9/envelopes")
        assert r.headers["x-relay-epoch"] != epoch, "history may be lost: the epoch must change"
        assert first in [row["seq"] for row in r.json()]
        seq = httpx.post(again.url + "/v1/workspaces/k9/envelopes", json={"i": 2}).json()["seq"]
        assert seq > last


def test_restart_without_snapshot_changes_epoch_and_keeps_seqs_rising() -> None:
    with RelayProcess() as relay:
        r = httpx.post(relay.url + "/v1/workspaces/nosnap/envelopes", json=1)
        before = r.json()["seq"]
        epoch = httpx.get(relay.url + "/v1/workspaces/nosnap/envelopes").headers["x-relay-epoch"]
    with RelayProcess() as relay:
        r = httpx.post(relay.url + "/v1/workspaces/nosnap/envelopes", json=2)
        assert r.json()["seq"] > before
        # A client holding the old cursor receives everything appended after it.
        page = httpx.get(relay.url + f"/v1/workspaces/nosnap/envelopes?after={before}")
        assert [row["body"] for row in page.json()] == [2]
        assert page.headers["x-relay-epoch"] != epoch


def _wait_for_periodic_snapshot(path: Path, since: float) -> None:
    """Until the relay has written a periodic snapshot with rows after `since` (reading
    one while the relay writes is safe: each is renamed into place whole)."""
    deadline = time.monotonic() + WAIT
    while True:
        if path.exists():
            header, workspaces, _ = read_snapshot(path)
            fresh = not header["clean"] and header["written_at"] >= since
            if fresh and workspaces and workspaces[0].rows:
                return
        assert time.monotonic() < deadline, "the relay wrote no periodic snapshot"
        time.sleep(0.1)


def test_kill_9_during_snapshot_writes_leaves_a_loadable_snapshot(tmp_path: Path) -> None:
    """Snapshots written continuously under load; kill -9 at random moments; every
    restart must load a complete snapshot (the previous or the new one)."""
    env = _snapshot_env(tmp_path, HIVE_RELAY_SNAPSHOT_INTERVAL="1")
    rng = random.Random(7)
    pad = "x" * 2000
    total = 0
    for round_ in range(3):
        relay = RelayProcess(env=env).start()
        since = time.time()
        with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
            batch = [{"r": round_, "i": i, "pad": pad} for i in range(500)]
            for k in range(0, 4000, 500):
                c.post("/v1/workspaces/crash/envelopes/batch", json=[{**b, "k": k} for b in batch])
            total += 4000
            # Not a fixed sleep: on a loaded machine the first write of this round may
            # take longer, and the file would still be the last round's clean one.
            _wait_for_periodic_snapshot(tmp_path / FILENAME, since)
            c.post("/v1/workspaces/crash/envelopes/batch", json=[{**b, "k": -1} for b in batch])
            time.sleep(0.5 + rng.random())  # the kill lands before, during or after its write
        relay.stop(signal.SIGKILL)
        header, workspaces, _ = read_snapshot(tmp_path / FILENAME)  # loadable, checksummed
        assert header["clean"] is False
        assert workspaces and len(workspaces[0].rows) > 0
        with RelayProcess(env=env) as again:
            r = httpx.get(again.url + "/v1/workspaces/crash/envelopes?limit=1")
            assert r.status_code == 200 and r.json()
        # A temporary file left by the kill is cleaned up at start.
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_corrupt_or_foreign_snapshot_stops_start_up(tmp_path: Path) -> None:
    with RelayProcess(env=_snapshot_env(tmp_path)) as relay:
        httpx.post(relay.url + "/v1/workspaces/c/envelopes", json=1)
    snap = tmp_path / FILENAME
    good = snap.read_bytes()
    for bad, words in (
        (good[: len(good) // 2], "corrupt"),
        (good[:-3] + b"xyz", "corrupt"),
        (b"not a snapshot at all", "not a hive-relay snapshot"),
    ):
        snap.write_bytes(bad)
        relay = RelayProcess(env=_snapshot_env(tmp_path), wait=False).start()
        assert relay.proc is not None
        assert relay.proc.wait(20) == 2
        out = relay.logs()
        assert "HIVE_RELAY_DATA_DIR" in out and words in out, out
        assert "Traceback" not in out


def test_unwritable_data_dir_stops_start_up(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    relay = RelayProcess(env=_snapshot_env(target / "sub"), wait=False).start()
    assert relay.proc is not None and relay.proc.wait(20) == 2
    assert "HIVE_RELAY_DATA_DIR" in relay.logs() and "Traceback" not in relay.logs()


def test_snapshot_write_does_not_hold_the_event_loop_long(tmp_path: Path) -> None:
    """At 50,000 envelopes the snapshot is written off the loop: health answers while
    it is written. (Figures for docs are measured by bench/, not asserted here.)"""
    from relay.store.memory import MemoryStore
    from relay.store.snapshot import Snapshotter

    async def scenario() -> int:
        store = MemoryStore()
        body = b'"' + b"y" * 1000 + b'"'
        for start in range(0, 50_000, 1000):
            keys = [b"k%d" % i for i in range(start, start + 1000)]
            await store.append_batch("big", [body] * 1000, keys)
        snap = Snapshotter(store, str(tmp_path), 30)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.create_task(ticker())
        await snap.write(clean=True)
        t.cancel()
        return ticks

    ticks = asyncio.run(scenario())
    assert ticks > 1, "the loop kept running while the snapshot was written"
