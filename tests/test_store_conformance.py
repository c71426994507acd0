"""One suite of Store-level cases, run against every store (memory and Redis).

What a store promises the API layer (relay/store/base.py): seq assignment and
dedup, batches, cursor reads with their bounds, retention with the dropped
horizon, the side channels with their bounds, pairing codes, the epoch, and the
append listener (fed by any instance sharing the store, in seq order, once).
The Redis cases run against a private `redis-server` (tests/redisproc.py), or
`REDIS_URL` when set; the cluster cases against a private 3-primary Redis Cluster
(`redis+cluster://`, the session's `redis_cluster` fixture).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay.errors import store_error_status
from relay.store.base import (
    PAIR_ALPHABET,
    Bounds,
    Page,
    Store,
    StoreBusy,
    StoreFull,
    encode_row,
    row_seq,
)
from relay.store.memory import MemoryStore
from tests.redisproc import flush, redis_url
from tests.support import digest

pytestmark = pytest.mark.anyio
WAIT = 10.0  # upper bound for any wait on a condition; never a timing assertion
BIG = 1 << 40
MAX_U64 = (1 << 64) - 1

MakeStore = Callable[..., Awaitable[Any]]


@pytest.fixture(scope="session")
def redis_session_url() -> Any:
    with redis_url() as url:
        yield url


# The cluster cases start a 3-primary Redis Cluster once per session: slow, so
# `make test-fast` leaves them to `make test`.
@pytest.fixture(params=["memory", "redis", pytest.param("cluster", marks=pytest.mark.slow)])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """make(bounds) -> a started store; make(bounds, peer=s) -> another instance
    sharing s's data (the same object for the memory store, a second client for Redis)."""
    stores: list[Any] = []
    url = None
    if request.param == "redis":
        pytest.importorskip("redis", reason="the redis extra is not installed")
        url = request.getfixturevalue("redis_session_url")
        flush(url)
    elif request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        url = cluster.url

    async def make(bounds: Bounds | None = None, peer: Any = None) -> Any:
        if url is None:
            if peer is not None:
                return peer
            store: Any = MemoryStore(bounds or Bounds())
        else:
            from relay.store.redis import RedisStore

            store = RedisStore(url, bounds or (peer.bounds if peer is not None else Bounds()))
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def push(store: Store, ws: str, body: bytes, key: bytes | None = None) -> int:
    seq, dup = await store.append(ws, body, key if key is not None else digest(body))
    assert not dup
    return seq


async def read_all(store: Store, ws: str, after: int = 0) -> Page:
    return await store.read(ws, after, BIG, BIG)


def seqs(page: Page) -> list[int]:
    return [row_seq(r) for r in page.rows]


async def wait_for(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not cond():
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------ appends
async def test_append_assigns_increasing_time_based_seqs(make_store: MakeStore) -> None:
    store = await make_store()
    before = time.time_ns() // 1000
    got = [await push(store, "w", b'{"n":%d}' % i) for i in range(50)]
    assert got == sorted(got)
    assert len(set(got)) == len(got)
    assert got[0] >= before  # max(now in µs, head + 1)
    assert got[-1] < 1 << 53  # safe in JavaScript
    page = await read_all(store, "w")
    assert seqs(page) == got
    assert page.head == got[-1]
    assert page.oldest == got[0]
    assert page.dropped == 0
    assert not page.more


async def test_rows_are_encoded_rows_and_bodies_byte_for_byte(make_store: MakeStore) -> None:
    store = await make_store()
    bodies = [
        b'{"a": [1, 2],\n  "b": "\\u00e9\xc3\xa9"}',
        b"  null",
        b'"a string with \\" quote"',
        b"12345678901234567890",
        b"[]",
        b'{"blob":"' + b"x" * (1 << 20) + b'"}',
    ]
    seqs_ = [await push(store, "w", b) for b in bodies]
    page = await read_all(store, "w")
    assert page.rows == [encode_row(s, b) for s, b in zip(seqs_, bodies, strict=True)]
    assert page.json() == b"[" + b",".join(page.rows) + b"]"


async def test_workspaces_are_independent(make_store: MakeStore) -> None:
    store = await make_store()
    a = await push(store, "a", b"1")
    b = await push(store, "b", b"1")  # same body, same digest, other workspace
    assert seqs(await read_all(store, "a")) == [a]
    assert seqs(await read_all(store, "b")) == [b]


async def test_dedup_by_key_returns_the_original_seq(make_store: MakeStore) -> None:
    store = await make_store()
    first = await push(store, "w", b'{"x":1}')
    assert await store.append("w", b'{"x":1}', digest(b'{"x":1}')) == (first, True)
    # An explicit key wins over the body: another body, same key → duplicate.
    keyed = await push(store, "w", b'{"x":2}', b"kevent-1")
    assert await store.append("w", b'{"x":3}', b"kevent-1") == (keyed, True)
    # Keys are bytes: binary digests and arbitrary UTF-8 keys both work.
    odd = await push(store, "w", b'{"x":4}', b"k\x00\xff\xc3\xa9 key")
    assert await store.append("w", b"0", b"k\x00\xff\xc3\xa9 key") == (odd, True)
    page = await read_all(store, "w")
    assert seqs(page) == [first, keyed, odd]
    assert page.head == odd


# ------------------------------------------------------------------- batches
async def test_batch_appends_in_order_with_dedup(make_store: MakeStore) -> None:
    store = await make_store()
    old = await push(store, "w", b'"old"')
    bodies = [b'"a"', b'"old"', b'"b"', b'"a"', b'"c"']
    keys = [digest(b) for b in bodies]
    out = await store.append_batch("w", bodies, keys)
    a, b, c = out[0][0], out[2][0], out[4][0]
    assert out == [(a, False), (old, True), (b, False), (a, True), (c, False)]
    assert old < a < b < c
    page = await read_all(store, "w")
    assert seqs(page) == [old, a, b, c]
    assert page.rows[1:] == [encode_row(a, b'"a"'), encode_row(b, b'"b"'), encode_row(c, b'"c"')]
    # The same batch again is all duplicates and appends nothing.
    assert await store.append_batch("w", bodies, keys) == [
        (a, True),
        (old, True),
        (b, True),
        (a, True),
        (c, True),
    ]
    assert (await read_all(store, "w")).head == c


async def test_large_batch(make_store: MakeStore) -> None:
    store = await make_store()
    bodies = [b'{"i":%d}' % i for i in range(1000)]
    out = await store.append_batch("w", bodies, [digest(b) for b in bodies])
    assert [d for _, d in out] == [False] * 1000
    got = [s for s, _ in out]
    assert got == sorted(set(got))
    assert seqs(await read_all(store, "w")) == got


# --------------------------------------------------------------------- reads
async def test_read_unknown_workspace_is_empty(make_store: MakeStore) -> None:
    store = await make_store()
    page = await read_all(store, "nobody")
    assert (page.rows, page.head, page.oldest, page.dropped, page.more) == ([], 0, 0, 0, False)


async def test_read_after_cursor_limit_and_more(make_store: MakeStore) -> None:
    store = await make_store()
    got = [await push(store, "w", b"%d" % i) for i in range(4)]
    # A seq is the clock in microseconds, or the last seq + 1 when two appends share
    # a microsecond (as they did once here): leave the clock time to move on, so
    # that there is a cursor strictly between got[3] and got[4].
    await asyncio.sleep(0.002)
    got += [await push(store, "w", b"%d" % i) for i in range(4, 10)]
    assert got[4] > got[3] + 1
    assert seqs(await store.read("w", got[3], BIG, BIG)) == got[4:]
    assert seqs(await store.read("w", got[3] + 1, BIG, BIG)) == got[4:]  # between seqs
    page = await store.read("w", 0, 4, BIG)
    assert seqs(page) == got[:4]
    assert page.more
    page = await store.read("w", got[5], 4, BIG)
    assert seqs(page) == got[6:]
    assert not page.more  # exactly the rest
    for after in (got[-1], got[-1] + 1, MAX_U64):
        page = await store.read("w", after, BIG, BIG)
        assert page.rows == []
        assert not page.more
        assert page.head == got[-1]
        assert page.oldest == got[0]


async def test_read_page_byte_cap_always_returns_a_row(make_store: MakeStore) -> None:
    store = await make_store()
    bodies = [b'"%s"' % (b"x" * n) for n in (10, 20, 30, 40)]
    got = [await push(store, "w", b) for b in bodies]
    sizes = [len(encode_row(s, b)) for s, b in zip(got, bodies, strict=True)]
    page = await store.read("w", 0, BIG, 1)
    assert seqs(page) == got[:1]
    assert page.more
    page = await store.read("w", 0, BIG, sizes[0] + sizes[1])
    assert seqs(page) == got[:2]
    assert page.more
    page = await store.read("w", 0, BIG, sizes[0] + sizes[1] - 1)
    assert seqs(page) == got[:1]
    page = await store.read("w", got[0], BIG, sum(sizes[1:]))
    assert seqs(page) == got[1:]
    assert not page.more
    page = await store.read("w", got[0], 2, sum(sizes))
    assert seqs(page) == got[1:3]
    assert page.more


async def test_read_many_small_rows_in_one_page(make_store: MakeStore) -> None:
    store = await make_store()
    bodies = [b"%d" % i for i in range(3000)]
    out = await store.append_batch("w", bodies, [digest(b) for b in bodies])
    page = await store.read("w", 0, BIG, BIG)
    assert seqs(page) == [s for s, _ in out]
    assert not page.more
    page = await store.read("w", out[100][0], 2000, BIG)
    assert seqs(page) == [s for s, _ in out[101:2101]]
    assert page.more


# ----------------------------------------------------------------- retention
async def test_retention_by_count_and_the_dropped_horizon(make_store: MakeStore) -> None:
    store = await make_store(Bounds(max_envelopes=3))
    got = [await push(store, "w", b"%d" % i) for i in range(5)]
    page = await read_all(store, "w")
    assert seqs(page) == got[2:]
    assert (page.head, page.oldest, page.dropped) == (got[4], got[2], got[1])
    assert page.gap(0)
    assert page.gap(got[0])
    assert not page.gap(got[1])
    # A dropped key is forgotten (appends anew); a retained one still dedups.
    assert await store.append("w", b"4", digest(b"4")) == (got[4], True)
    again, dup = await store.append("w", b"0", digest(b"0"))
    assert not dup
    assert again > got[4]
    page = await read_all(store, "w")
    assert seqs(page) == [got[3], got[4], again]
    assert page.dropped == got[2]
    # A batch larger than the cap keeps the newest.
    bodies = [b'"b%d"' % i for i in range(5)]
    out = await store.append_batch("w", bodies, [digest(b) for b in bodies])
    page = await read_all(store, "w")
    assert seqs(page) == [s for s, _ in out[2:]]
    assert page.dropped == out[1][0]


async def test_retention_by_age(make_store: MakeStore) -> None:
    store = await make_store(Bounds(retention_secs=0.3))
    a = await push(store, "w", b'"a"')
    b = await push(store, "w", b'"b"')
    await asyncio.sleep(0.4)
    c = await push(store, "w", b'"c"')
    page = await read_all(store, "w")
    assert seqs(page) == [c]
    assert (page.oldest, page.dropped) == (c, b)
    assert page.gap(a)
    assert not page.gap(b)
    # The dropped rows' keys are forgotten.
    assert (await store.append("w", b'"a"', digest(b'"a"')))[1] is False


@pytest.mark.slow  # waits out a real TTL of about a second
async def test_retention_by_age_reaches_idle_workspaces(make_store: MakeStore) -> None:
    store = await make_store(Bounds(retention_secs=0.2))
    a = await push(store, "w", b'"a"')
    b = await push(store, "w", b'"b"')

    async def emptied() -> Page:
        async with asyncio.timeout(WAIT):
            while True:
                if hasattr(store, "sweep"):
                    store.sweep(lambda ws: True)  # the memory store's house-keeping
                page = await read_all(store, "w")
                if not page.rows:
                    return page
                await asyncio.sleep(0.05)

    page = await emptied()
    assert (page.head, page.oldest, page.dropped) == (b, 0, b)
    assert page.gap(a)
    c = await push(store, "w", b'"c"')
    assert c > b
    page = await read_all(store, "w")
    assert seqs(page) == [c]
    assert page.dropped == b


# -------------------------------------------------------------- side channels
async def test_keyring_append_list_and_bounds(make_store: MakeStore) -> None:
    store = await make_store(Bounds(max_keyring=2, max_side_bytes=16))
    assert await store.keyring_list("w") == []
    await store.keyring_append("w", b'{"k":1}')
    await store.keyring_append("w", b'"two"')
    with pytest.raises(StoreFull) as full:
        await store.keyring_append("w", b"3")
    assert (full.value.code, store_error_status(full.value)) == ("keyring_full", 413)
    with pytest.raises(StoreFull) as big:
        await store.keyring_append("other", b'"' + b"x" * 20 + b'"')
    assert (big.value.code, store_error_status(big.value)) == ("too_large", 413)
    assert await store.keyring_list("w") == [b'{"k":1}', b'"two"']
    assert await store.keyring_list("other") == []


async def test_device_channels_replace_and_bounds(make_store: MakeStore) -> None:
    store = await make_store(Bounds(max_devices=2, max_side_bytes=32))
    for channel in ("presence", "candidates"):
        assert await store.device_map(channel, "w") == []
    await store.device_put("presence", "w", "a", b'{"on":1}')
    await store.device_put("presence", "w", "bé", b"[1, 2]")
    with pytest.raises(StoreFull) as full:
        await store.device_put("presence", "w", "c", b"1")
    assert (full.value.code, store_error_status(full.value)) == ("too_many_devices", 413)
    await store.device_put("presence", "w", "a", b'{"on":2}')  # replacing is fine when full
    with pytest.raises(StoreFull) as big:
        await store.device_put("presence", "w", "a", b"x" * 33)
    assert big.value.code == "too_large"
    assert dict(await store.device_map("presence", "w")) == {"a": b'{"on":2}', "bé": b"[1, 2]"}
    # Channels are independent.
    await store.device_put("candidates", "w", "c", b'"ice"')
    assert dict(await store.device_map("candidates", "w")) == {"c": b'"ice"'}
    with pytest.raises(ValueError):
        await store.device_put("nope", "w", "a", b"1")


@pytest.mark.slow  # waits out a real TTL of about a second
async def test_presence_ttl_expires_entries(make_store: MakeStore) -> None:
    # A TTL well above what three store calls take on a loaded machine: with 0.3 s,
    # a test process stalled that long between the put and the count sees "a" gone.
    store = await make_store(Bounds(max_devices=2, presence_ttl=1.5))
    await store.device_put("presence", "w", "a", b"1")
    await store.device_put("presence", "w", "b", b"2")
    assert len(await store.device_map("presence", "w")) == 2
    await asyncio.sleep(1.6)
    assert await store.device_map("presence", "w") == []
    # Expired entries no longer count against the bound.
    await store.device_put("presence", "w", "c", b"3")
    await store.device_put("presence", "w", "d", b"4")
    assert dict(await store.device_map("presence", "w")) == {"c": b"3", "d": b"4"}


async def test_entries_without_ttl_stay(make_store: MakeStore) -> None:
    store = await make_store(Bounds(presence_ttl=0))
    await store.device_put("presence", "w", "a", b"1")
    await asyncio.sleep(0.05)
    assert await store.device_map("presence", "w") == [("a", b"1")]


# ------------------------------------------------------------------- pairing
async def test_pairing_codes(make_store: MakeStore) -> None:
    store = await make_store()
    codes = {await store.pair_create(f"payload {i} é", 60) for i in range(20)}
    assert len(codes) == 20
    for code in codes:
        assert len(code) == 6
        assert set(code) <= set(PAIR_ALPHABET)
    code = sorted(codes)[0]
    payload = await store.pair_resolve(code)
    assert payload is not None
    assert payload.startswith("payload ")
    assert payload.endswith(" é")
    assert await store.pair_resolve("000000" if "000000" not in codes else "111111") is None


@pytest.mark.slow  # waits out a real TTL of about a second
async def test_pairing_codes_expire(make_store: MakeStore) -> None:
    store = await make_store()
    code = await store.pair_create("soon gone", 1)
    assert await store.pair_resolve(code) == "soon gone"
    await asyncio.sleep(1.1)
    assert await store.pair_resolve(code) is None


@pytest.mark.slow  # waits out a real TTL of about a second
async def test_pairing_code_bound(make_store: MakeStore) -> None:
    store = await make_store(Bounds(max_pairings=2))
    await store.pair_create("a", 1)
    await store.pair_create("b", 60)
    with pytest.raises(StoreBusy) as busy:
        await store.pair_create("c", 60)
    assert (busy.value.code, store_error_status(busy.value)) == ("too_many_pairings", 503)
    assert busy.value.retry_after
    await asyncio.sleep(1.1)  # the first one expired: room again
    await store.pair_create("c", 60)


@pytest.mark.slow  # waits out a real TTL of about a second
async def test_pairing_codes_expire_by_time_not_by_creation_order(make_store: MakeStore) -> None:
    """A short-lived code made after long-lived ones frees its place when it expires,
    once: a lookup that finds it expired and the expiry sweep do not count it twice."""
    store = await make_store(Bounds(max_pairings=3))
    first = await store.pair_create("first", 60)
    brief = await store.pair_create("brief", 1)
    last = await store.pair_create("last", 60)
    with pytest.raises(StoreBusy):
        await store.pair_create("no room", 60)
    await asyncio.sleep(1.1)
    assert await store.pair_resolve(brief) is None
    again = await store.pair_create("again", 60)
    with pytest.raises(StoreBusy):
        await store.pair_create("still no room", 60)
    assert [await store.pair_resolve(c) for c in (first, last, again)] == ["first", "last", "again"]
    assert (await store.stats()).pairings == 3


# --------------------------------------------------------------------- epoch
async def test_epoch_is_stable(make_store: MakeStore) -> None:
    store = await make_store()
    epoch = store.epoch
    assert isinstance(epoch, str)
    assert epoch
    await push(store, "w", b"1")
    await read_all(store, "w")
    assert store.epoch == epoch
    peer = await make_store(peer=store)
    await read_all(peer, "w")
    assert peer.epoch == epoch  # every instance sharing the store reports one epoch


# ------------------------------------------------------------------- listener
def _listen(store: Any, ws: str) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []

    def listener(w: str, rows: list[tuple[int, bytes]]) -> None:
        if w == ws:
            got.extend(rows)

    store.set_listener(listener)
    watch = getattr(store, "watch", None)
    if watch is not None:
        watch(ws)  # what the hub does for its first local subscriber
    return got


async def test_listener_sees_every_row_once_in_order(make_store: MakeStore) -> None:
    store = await make_store()
    peer = await make_store(peer=store)
    before = await push(store, "w", b'"before"')
    got = _listen(store, "w")
    # A subscriber reads first (replay); from then on the listener must deliver.
    start = (await store.read("w", before, 1, 1)).head
    expected: list[int] = []
    big = b'"' + b"b" * (100 * 1024) + b'"'  # too big to ride along in a notification
    for i in range(20):
        src = store if i % 2 else peer
        expected.append(await push(src, "w", b'{"i":%d}' % i))
        if i == 10:
            expected.append(await push(peer, "w", big))
    bodies = [b'{"batch":%d}' % i for i in range(30)]
    out = await peer.append_batch("w", bodies, [digest(b) for b in bodies])
    expected += [s for s, _ in out]
    await push(store, "other", b"1")  # another workspace: not delivered here
    await wait_for(lambda: bool(got) and got[-1][0] >= expected[-1])
    delivered = [s for s, _ in got if s > start]
    assert delivered == expected
    page = await read_all(store, "w", start)
    assert [r for s, r in got if s > start] == page.rows


async def test_listener_with_concurrent_writers(make_store: MakeStore) -> None:
    store = await make_store()
    peers = [await make_store(peer=store) for _ in range(2)]
    got = _listen(store, "w")
    start = (await store.read("w", 0, 1, 1)).head

    async def writer(src: Any, tag: int) -> None:
        for i in range(40):
            await push(src, "w", b'{"w":%d,"i":%d}' % (tag, i))

    async with asyncio.timeout(WAIT):
        await asyncio.gather(*(writer(s, n) for n, s in enumerate([store, *peers])))
    page = await read_all(store, "w", start)
    await wait_for(lambda: bool(got) and got[-1][0] >= page.head)
    assert [s for s, _ in got if s > start] == seqs(page)
    assert len(page.rows) == 120


async def test_stats(make_store: MakeStore) -> None:
    store = await make_store(Bounds(max_envelopes=3))
    rows = [encode_row(await push(store, "a", b"%d" % i), b"%d" % i) for i in range(5)]
    await push(store, "b", b'"x"')
    await store.pair_create("p", 60)
    stats = await store.stats()
    assert stats.workspaces == 2
    assert stats.envelopes == 4
    assert stats.stored_bytes == sum(len(r) for r in rows[2:]) + len(
        (await read_all(store, "b")).rows[0]
    )
    assert stats.pairings == 1
