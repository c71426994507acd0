"""Replica-acknowledged writes and Sentinel failover, on real redis-server processes.

HIVE_RELAY_REDIS_MIN_REPLICAS=1: a write is acknowledged only once a replica holds
it; with the replica paused (SIGSTOP) the relay answers 503 with Retry-After, and
the client's retry with the same idempotency key, once the replica is back, gets the
same seq with "duplicate": true and one stored row. Through Sentinel, a SIGKILLed
primary is replaced by its replica while a relay publishes and an SSE subscriber
follows: no relay restart, no acknowledged envelope lost, every acknowledged row seen
once in order. No subscriber or reader on any relay is shown a row before WAIT saw
it on the replica (the confirmed head, relay/store/lua/commit.lua).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from relay.store.base import Bounds, StoreUnavailable
from relay.store.redis import RedisStore
from tests.redisproc import RedisServer, Sentinels, own_server_required
from tests.relayproc import RelayProcess

pytest.importorskip("redis", reason="the redis extra is not installed")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WAIT = 20.0  # upper bound for any single wait; tests never assert on durations


def env(url: str, wait_ms: int = 300) -> dict[str, str]:
    return {
        "HIVE_RELAY_STORE": url,
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_KEEPALIVE_SECS": "0.3",
        "HIVE_RELAY_REDIS_MIN_REPLICAS": "1",
        "HIVE_RELAY_REDIS_WAIT_MS": str(wait_ms),
    }


def wait_synced(replica: RedisServer) -> None:
    client = replica.client()
    try:
        for _ in range(400):
            if client.info("replication").get("master_link_status") == "up":
                return
            time.sleep(0.05)
        raise AssertionError("the replica did not sync")
    finally:
        client.close()


async def test_paused_replica_answers_503_and_the_retry_gets_the_same_seq() -> None:
    own_server_required()
    with RedisServer() as primary, RedisServer(replica_of=primary.port) as replica:
        wait_synced(replica)
        with RelayProcess(env=env(primary.url)) as relay:
            async with httpx.AsyncClient(base_url=relay.url, timeout=WAIT) as c:
                url = "/v1/workspaces/acked/envelopes"
                r = await c.post(url, json={"n": 0}, headers={"Idempotency-Key": "k0"})
                assert r.status_code == 200, r.text
                first = r.json()["seq"]
                replica.pause()
                try:
                    r = await c.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                    assert r.status_code == 503, r.text
                    assert int(r.headers["retry-after"]) > 0
                    assert r.json()["error"] == "store_unavailable"
                    # Still paused: the retry finds the row stored but not replicated,
                    # so it is not acknowledged either.
                    r = await c.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                    assert r.status_code == 503, r.text
                    # Side-channel writes wait for the replica the same way.
                    store = RedisStore(primary.url, Bounds(), min_replicas=1, wait_ms=200)
                    try:
                        with pytest.raises(StoreUnavailable):
                            await store.keyring_append("acked", b'"blob"')
                        with pytest.raises(StoreUnavailable):
                            await store.device_put("presence", "acked", "d1", b'"here"')
                    finally:
                        await store.close()
                finally:
                    replica.resume()
                r = await c.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                assert r.status_code == 200, r.text
                second = r.json()
                assert second["duplicate"] is True
                r = await c.get(url, params={"after": 0})
                assert [row["seq"] for row in r.json()] == [first, second["seq"]]
        probe = primary.client()
        try:
            assert probe.xlen("relay:{acked}:log") == 2
        finally:
            probe.close()


async def _follow(c: httpx.AsyncClient, ws: str, got: list[Any], stop: asyncio.Event) -> None:
    """An SSE subscriber that, like the SDK, reconnects from its last seq."""
    while not stop.is_set():
        after = got[-1]["seq"] if got else 0
        try:
            async with c.stream(
                "GET", f"/v1/workspaces/{ws}/events", params={"bodies": "1", "after": after}
            ) as s:
                if s.status_code != 200:
                    await asyncio.sleep(0.2)
                    continue
                buf = b""
                async for chunk in s.aiter_raw():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        data = [ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: ")]
                        if data:
                            got.append(json.loads(b"\n".join(data)))
        except httpx.HTTPError:
            await asyncio.sleep(0.2)


async def test_sentinel_failover_loses_no_acknowledged_envelope() -> None:
    own_server_required()
    with (
        RedisServer(aof=True) as primary,
        RedisServer(aof=True, replica_of=primary.port) as replica,
    ):
        wait_synced(replica)
        with Sentinels(primary) as sentinels, RelayProcess(env=env(sentinels.url, 500)) as relay:
            async with httpx.AsyncClient(base_url=relay.url, timeout=WAIT) as c:
                got: list[Any] = []
                stop = asyncio.Event()
                follower = asyncio.create_task(_follow(c, "fo", got, stop))
                acked: dict[int, int] = {}
                statuses: set[int] = set()

                async def publish(i: int) -> None:
                    async with asyncio.timeout(WAIT * 2):
                        while True:
                            try:
                                r = await c.post(
                                    "/v1/workspaces/fo/envelopes",
                                    json={"i": i},
                                    headers={"Idempotency-Key": f"k{i}"},
                                )
                            except httpx.HTTPError:
                                await asyncio.sleep(0.1)
                                continue
                            statuses.add(r.status_code)
                            if r.status_code == 200:
                                acked[i] = r.json()["seq"]
                                return
                            assert r.status_code == 503, r.text
                            assert int(r.headers["retry-after"]) > 0
                            await asyncio.sleep(0.1)

                for i in range(15):
                    await publish(i)
                primary.kill()
                killed = asyncio.gather(*(publish(i) for i in range(15, 30)))
                async with asyncio.timeout(WAIT):
                    while sentinels.primary_port() != replica.port:
                        await asyncio.sleep(0.1)
                primary.start()  # the old primary comes back; Sentinel makes it a replica
                await killed
                for i in range(30, 40):
                    await publish(i)
                async with asyncio.timeout(WAIT):
                    while len(got) < len(acked):
                        await asyncio.sleep(0.05)
                stop.set()
                follower.cancel()
                r = await c.get("/v1/workspaces/fo/envelopes", params={"after": 0})
                rows = r.json()
        seqs = [row["seq"] for row in rows]
        assert sorted(acked.values()) == seqs  # every acknowledged envelope, once
        assert seqs == sorted(set(seqs))
        assert {row["seq"]: row["body"]["i"] for row in rows} == {s: i for i, s in acked.items()}
        # The subscriber saw every acknowledged row, once each, in order, and nothing
        # else: a row is announced only after WAIT saw it on the replica, so none
        # that died with the old primary was ever shown.
        assert [row["seq"] for row in got] == seqs
        assert 500 not in statuses


class SseRecorder:
    """A raw SSE subscriber (bodies=1) that records rows and counts keep-alive frames."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.keepalives = 0

    async def run(self, c: httpx.AsyncClient, ws: str) -> None:
        async with c.stream(
            "GET", f"/v1/workspaces/{ws}/events", params={"bodies": "1", "after": 0}
        ) as s:
            assert s.status_code == 200
            buf = b""
            async for chunk in s.aiter_raw():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if event == b": keep-alive":
                        self.keepalives += 1
                    data = [ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: ")]
                    if data:
                        self.rows.append(json.loads(b"\n".join(data)))

    async def quiet_for(self, frames: int) -> None:
        """Until `frames` more keep-alives arrived: the stream is live and had its chance."""
        target = self.keepalives + frames
        async with asyncio.timeout(WAIT):
            while self.keepalives < target:
                await asyncio.sleep(0.02)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.rows) < count:
                await asyncio.sleep(0.02)


async def test_no_relay_shows_a_row_before_its_wait_succeeded() -> None:
    """A row whose WAIT failed reaches no subscriber and no reader on another relay;
    the retry that succeeds announces it once; a row whose writer gave up is shown
    once a replica holds it (confirmed by the relay that read it)."""
    own_server_required()
    with RedisServer() as primary, RedisServer(replica_of=primary.port) as replica:
        wait_synced(replica)
        with RelayProcess(env=env(primary.url)) as one, RelayProcess(env=env(primary.url)) as two:
            async with (
                httpx.AsyncClient(base_url=one.url, timeout=WAIT) as c1,
                httpx.AsyncClient(base_url=two.url, timeout=WAIT) as c2,
            ):
                url = "/v1/workspaces/gated/envelopes"
                sub = SseRecorder()
                task = asyncio.create_task(sub.run(c2, "gated"))
                try:
                    await sub.quiet_for(1)
                    r = await c1.post(url, json={"n": 0}, headers={"Idempotency-Key": "k0"})
                    assert r.status_code == 200, r.text
                    first = r.json()["seq"]
                    await sub.until(1)

                    replica.pause()
                    try:
                        r = await c1.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                        assert r.status_code == 503, r.text
                        await sub.quiet_for(3)
                        assert [row["seq"] for row in sub.rows] == [first]
                        # A reader on the other relay reads the primary, which holds
                        # the row: it is not shown, and the head is the confirmed one.
                        r = await c2.get(url, params={"after": 0})
                        assert [row["seq"] for row in r.json()] == [first]
                        assert r.headers["x-relay-head"] == str(first)
                        # A new subscriber (replay read, then live) does not get it either.
                        late = SseRecorder()
                        late_task = asyncio.create_task(late.run(c1, "gated"))
                        await late.until(1)
                        await late.quiet_for(2)
                        assert [row["seq"] for row in late.rows] == [first]
                    finally:
                        replica.resume()
                    wait_synced(replica)
                    r = await c1.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                    assert r.status_code == 200, r.text
                    assert r.json()["duplicate"] is True
                    second = r.json()["seq"]
                    await sub.until(2)
                    await late.until(2)
                    await sub.quiet_for(2)
                    assert [row["seq"] for row in sub.rows] == [first, second]
                    assert [row["seq"] for row in late.rows] == [first, second]
                    late_task.cancel()

                    # A writer that gives up after its 503: the row is confirmed by
                    # the relay that next reads it, once a replica holds it, and
                    # reaches the subscriber once.
                    replica.pause()
                    try:
                        r = await c1.post(url, json={"n": 2}, headers={"Idempotency-Key": "k2"})
                        assert r.status_code == 503, r.text
                    finally:
                        replica.resume()
                    wait_synced(replica)
                    async with asyncio.timeout(WAIT):
                        while True:
                            r = await c2.get(url, params={"after": second})
                            if r.json():
                                break
                            await asyncio.sleep(0.2)
                    third = r.json()[0]["seq"]
                    assert r.json()[0]["body"] == {"n": 2}
                    await sub.until(3)
                    await sub.quiet_for(2)
                    assert [row["seq"] for row in sub.rows] == [first, second, third]
                finally:
                    task.cancel()
