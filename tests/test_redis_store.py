"""The Redis store in-process, against a private redis-server: what only Redis has.

The shared semantics are in tests/test_store_conformance.py. Here: the key layout
(one Cluster slot per workspace), the epoch (shared, kept across restarts, renewed
when Redis loses its data), a full Redis (maxmemory) refusing writes with 503 and
leaving no partial batch, Redis down or hung (StoreUnavailable within a bounded
time, ping False, recovery without a new store), and live delivery surviving a
pub/sub reconnect and watch churn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from relay.errors import store_error_status
from relay.store.base import Bounds, StoreBusy, StoreError, StoreUnavailable, row_seq
from tests.redisproc import RedisServer, flush, own_server_required, redis_url
from tests.support import digest

redis = pytest.importorskip("redis", reason="the redis extra is not installed")
from redis.crc import key_slot  # noqa: E402

from relay.store.redis import RedisStore  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WAIT = 10.0
BIG = 1 << 40


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with redis_url() as u:
        yield u


@pytest.fixture
async def stores(url: str) -> AsyncIterator[Any]:
    flush(url)
    made: list[RedisStore] = []

    async def make(bounds: Bounds | None = None, at: str | None = None) -> RedisStore:
        store = RedisStore(at or url, bounds or Bounds())
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    own_server_required()
    with RedisServer(aof=True) as s:
        yield s


async def push(store: RedisStore, ws: str, body: bytes) -> int:
    seq, dup = await store.append(ws, body, digest(body))
    assert not dup
    return seq


async def wait_for(cond: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not cond():
            await asyncio.sleep(0.01)


def sync_client(url: str) -> Any:
    return redis.Redis.from_url(url)


async def test_every_key_of_a_workspace_shares_one_cluster_slot(stores: Any, url: str) -> None:
    store = await stores(Bounds(presence_ttl=60))
    for ws in ("w1", "Some.Workspace_~:@-9"):
        await push(store, ws, b"1")
        await store.keyring_append(ws, b'"k"')
        await store.device_put("presence", ws, "d", b"1")
        await store.device_put("candidates", ws, "d", b"1")
    await store.pair_create("p", 60)
    client = sync_client(url)
    keys = sorted(k.decode() for k in client.keys("*"))
    client.close()
    for ws in ("w1", "Some.Workspace_~:@-9"):
        mine = [k for k in keys if k.startswith(f"relay:{{{ws}}}:")]
        assert len(mine) >= 7, mine
        assert {key_slot(k.encode()) for k in mine} == {key_slot(ws.encode())}
    pair = [k for k in keys if k.startswith("relay:{pair}:")]
    assert len({key_slot(k.encode()) for k in pair}) == 1
    assert set(keys) - set(pair) - {k for k in keys if ":{w1}:" in k or ":{Some." in k} <= {
        "relay:epoch",
        "relay:stats",
    }


async def test_epoch_is_shared_kept_and_renewed_only_when_redis_lost_data(
    stores: Any, url: str
) -> None:
    a = await stores()
    b = await stores()
    assert a.epoch == b.epoch
    epoch = a.epoch
    seq = await push(a, "w", b"1")
    await a.close()
    again = await stores()  # a relay restart
    assert again.epoch == epoch
    assert [row_seq(r) for r in (await again.read("w", 0, 10, BIG)).rows] == [seq]
    flush(url)  # Redis lost everything
    page = await again.read("w", 0, 10, BIG)
    assert page.rows == []
    assert again.epoch != epoch
    # The other instance adopts the same new epoch (on its next read, or by itself).
    await b.read("w", 0, 10, BIG)
    assert b.epoch == again.epoch
    # Seqs never rewind, even over a wiped Redis.
    assert await push(b, "w", b"2") > seq


async def test_a_full_redis_refuses_writes_whole(stores: Any, url: str) -> None:
    store = await stores()
    first = await push(store, "w", b'"first"')
    client = sync_client(url)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 256 * 1024)
    try:
        body = b'"' + b"x" * 64 * 1024 + b'"'
        with pytest.raises(StoreBusy) as busy:
            for i in range(100):
                bodies = [body[:-1] + b'%d"' % (i * 10 + j) for j in range(10)]
                await store.append_batch("w", bodies, [digest(b) for b in bodies])
        assert (busy.value.code, store_error_status(busy.value)) == ("relay_full", 503)
        assert busy.value.retry_after
        page = await store.read("w", 0, BIG, BIG)
        assert len(page.rows) % 10 == 1  # whole batches only
        with pytest.raises(StoreBusy):  # side channels too, once Redis is past maxmemory
            for _ in range(100):
                await store.keyring_append("w", body[: 60 * 1024])
        assert await store.ping()
    finally:
        client.config_set("maxmemory", 0)
        client.close()
    assert await push(store, "w", b'"after"') > first


async def test_redis_down_is_unavailable_then_recovers(stores: Any, server: RedisServer) -> None:
    store = await stores(at=server.url)
    got: list[int] = []
    store.set_listener(lambda ws, rows: got.extend(s for s, _ in rows))
    store.watch("w")
    await store.read("w", 0, 1, 1)
    seq = await push(store, "w", b"1")
    server.kill()
    async with asyncio.timeout(WAIT):
        assert not await store.ping()
        for call in (
            store.append("w", b"2", digest(b"2")),
            store.append_batch("w", [b"3"], [digest(b"3")]),
            store.read("w", 0, 10, BIG),
            store.keyring_append("w", b"1"),
            store.keyring_list("w"),
            store.device_put("presence", "w", "d", b"1"),
            store.device_map("presence", "w"),
            store.pair_create("p", 60),
            store.pair_resolve("AAAAAA"),
        ):
            with pytest.raises(StoreUnavailable) as exc:
                await call
            assert store_error_status(exc.value) == 503
            assert exc.value.retry_after
        await store.stats()  # the status page keeps working on cached counters
    server.start()  # same port, same AOF
    async with asyncio.timeout(WAIT):
        while not await store.ping():
            await asyncio.sleep(0.05)
    page = await store.read("w", 0, 10, BIG)
    assert [row_seq(r) for r in page.rows] == [seq]
    # Live delivery resumes by itself (the pub/sub connection reconnected).
    seq2 = await push(store, "w", b"4")
    other = await stores(at=server.url)
    seq3 = await push(other, "w", b"5")
    await wait_for(lambda: got and got[-1] == seq3)
    assert got == [seq, seq2, seq3]


async def test_hung_redis_answers_within_a_bounded_time(stores: Any, server: RedisServer) -> None:
    store = await stores(at=server.url + "?socket_timeout=0.5")
    await push(store, "w", b"1")
    server.pause()
    try:
        async with asyncio.timeout(WAIT):
            assert not await store.ping()
            with pytest.raises(StoreUnavailable):
                await store.append("w", b"2", digest(b"2"))
            with pytest.raises(StoreUnavailable):
                await store.read("w", 0, 10, BIG)
    finally:
        server.resume()
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await push(store, "w", b"3")
                break
            except StoreError:
                await asyncio.sleep(0.05)


async def test_live_delivery_survives_a_pubsub_reconnect(stores: Any, url: str) -> None:
    store = await stores()
    peer = await stores()
    got: list[int] = []
    store.set_listener(lambda ws, rows: got.extend(s for s, _ in rows) if ws == "w" else None)
    store.watch("w")
    start = (await store.read("w", 0, 1, 1)).head
    n = iter(range(1000))
    expected = [await push(peer, "w", b"%d" % next(n)) for _ in range(5)]
    await wait_for(lambda: len(got) == 5)
    client = sync_client(url)
    try:
        for _ in range(3):
            client.client_kill_filter(_type="pubsub")
            # Appends while the listener is disconnected reach it after it reconnects.
            expected += [await push(peer, "w", b"%d" % next(n)) for _ in range(5)]
            await asyncio.sleep(0.05)
    finally:
        client.close()
    expected += [await push(peer, "w", b"%d" % next(n)) for _ in range(5)]
    await wait_for(lambda: got and got[-1] == expected[-1])
    assert [s for s in got if s > start] == expected


async def test_watch_churn_never_loses_or_repeats_rows(stores: Any) -> None:
    store = await stores()
    peer = await stores()
    got: list[int] = []
    store.set_listener(lambda ws, rows: got.extend(s for s, _ in rows) if ws == "w" else None)
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            await push(peer, "w", b"%d" % i)
            i += 1

    task = asyncio.create_task(writer())
    try:
        for _ in range(20):
            store.watch("w")
            if _ % 3 == 0:
                await store.read("w", 0, 1, 1)
            await asyncio.sleep(0)
            store.unwatch("w")
        store.watch("w")
        got.clear()
        start = (await store.read("w", 0, 1, 1)).head
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await task
    last = (await store.read("w", 0, 1, 1)).head
    await wait_for(lambda: got and got[-1] == last)
    page = await store.read("w", start, BIG, BIG)
    assert [s for s in got if s > start] == [row_seq(r) for r in page.rows]
