"""The memory store's row chunks (relay.store.memory): pages as slices of them.

Small chunk bounds make a few hundred rows span many chunks, so every page shape
is met: inside the live rows, inside one sealed chunk, across chunks, across the
sealed part and the live rows, with rows dropped at a cap and the log cut.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from relay.store import memory
from relay.store.base import Bounds, encode_row
from relay.store.memory import MemoryStore, _Workspace
from relay.wire import Buffers
from tests.test_store_budget import check_books


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(memory, "CHUNK_MIN", 100)
    monkeypatch.setattr(memory, "CHUNK_MAX", 1200)
    monkeypatch.setattr(memory, "_COMPACT_MIN", 16)
    yield


def expected(rows: list[bytes]) -> bytes:
    return b"[" + b",".join(rows) + b"]"


def check_stream(w: _Workspace) -> None:
    """Chunks tile the stream with no gap; dropped rows hold less than the first chunk."""
    for k in range(1, len(w.chunks)):
        assert w.bases[k] == w.bases[k - 1] + len(w.chunks[k - 1])
    if w.count == 0:
        assert not w.chunks and not w.live
        return
    if w.chunks:
        dead = w.start_of(w.start) - w.bases[0]
        assert 0 <= dead < len(w.chunks[0])
        assert w.bases[-1] + len(w.chunks[-1]) == w.start_of(w.live_at - w.cut)
    assert w.live_bytes == sum(len(r) + 1 for r in w.live)
    assert w.live_at - w.cut >= w.start


@pytest.mark.parametrize("seed", range(6))
def test_pages_are_the_rows_joined_whatever_chunks_they_span(small_chunks: None, seed: int) -> None:
    rnd = random.Random(seed)
    cap = rnd.choice([0, 40, 150])
    store = MemoryStore(Bounds(max_envelopes=cap))
    model: list[tuple[int, bytes]] = []
    n = 0

    async def go() -> None:
        nonlocal n
        for step in range(120):
            bodies = [
                b'"%s"' % (b"x" * rnd.choice([1, 20, 90, 400])) for _ in range(rnd.randint(1, 6))
            ]
            keys = [b"k%d" % (n + i) for i in range(len(bodies))]
            n += len(bodies)
            if len(bodies) == 1 and rnd.random() < 0.5:
                seq, _ = await store.append("w", bodies[0], keys[0])
                got = [(seq, False)]
            else:
                got = await store.append_batch("w", bodies, keys)
            model.extend((s, encode_row(s, b)) for (s, _), b in zip(got, bodies, strict=True))
            if cap:
                del model[: max(0, len(model) - cap)]
            w = store._ws["w"]
            check_stream(w)
            if cap and step % 20 == 19:  # what a drop frees is its rows' bytes, chunks or not
                check_books(store)
            for _ in range(3):
                k = rnd.randrange(len(model))
                after = model[k - 1][0] if k else 0
                limit = rnd.choice([1, 2, 7, 50, 10**6])
                max_bytes = rnd.choice([1, 500, 3000, 1 << 30])
                page = store.read_now("w", after, limit, max_bytes)
                rows = page.rows
                want = [r for _, r in model[k : k + len(rows)]]
                assert rows == want and len(rows) >= 1
                assert sum(map(len, rows[:-1])) <= max_bytes and len(rows) <= limit
                assert page.more == (k + len(rows) < len(model))
                body = page.body(True)
                joined = body.join() if isinstance(body, Buffers) else body
                assert joined == page.json() == expected(rows)
                assert len(body) == len(joined)
                # A fresh read's rows, split from the pieces, are the same objects' bytes.
                again = store.read_now("w", after, limit, max_bytes)
                assert again.json() == page.json() and again.rows == rows
            state = store.export_state()[0][0]
            assert list(state.rows) == [r for _, r in model]
            assert state.seqs == [s for s, _ in model]

    asyncio.run(go())


def test_a_big_page_is_slices_of_sealed_chunks_not_a_copy(small_chunks: None) -> None:
    store = MemoryStore()
    bodies = [b'"%s"' % (b"y" * 100) for _ in range(60)]

    async def go() -> None:
        await store.append_batch("w", bodies, [b"k%d" % i for i in range(60)])

    asyncio.run(go())
    w = store._ws["w"]
    assert len(w.chunks) >= 3
    body = store.read_now("w", 0, 10**6, 1 << 30).body(True)
    assert isinstance(body, Buffers)
    sealed = [p for p in body.parts if isinstance(p, memoryview) or p in w.chunks]
    assert sealed, body.parts
    for p in sealed:  # lent, not copied: they share the chunk's memory
        assert any((p.obj if isinstance(p, memoryview) else p) is c for c in w.chunks)
    # A server that cannot write pieces gets one bytes object.
    assert store.read_now("w", 0, 10**6, 1 << 30).body(False) == body.join()


def test_dropped_rows_free_their_chunks_and_the_snapshot_copy_stays(small_chunks: None) -> None:
    store = MemoryStore(Bounds(max_envelopes=100))
    bodies = [b'"%s"' % (b"z" * 50) for _ in range(400)]

    async def go() -> None:
        for i, b in enumerate(bodies):
            await store.append("w", b, b"k%d" % i)

    asyncio.run(go())
    w = store._ws["w"]
    check_stream(w)
    check_books(store)
    assert w.chunks
    # 100 rows of about 80 bytes retained: the stream holds little more than them
    # (dropped rows: less than the first chunk, 1/32 of the rows).
    retained = w.end_of(len(w.seqs) - 1) - w.start_of(w.start) + 1
    held = sum(map(len, w.chunks)) + w.live_bytes
    assert held <= retained + retained // 32 + 1
    state = store.export_state()[0][0]
    before = list(state.rows)

    async def more() -> None:
        for i, b in enumerate(bodies):
            await store.append("w", b[:-1] + b'q"', b"m%d" % i)

    asyncio.run(more())
    assert list(state.rows) == before  # taken before: unchanged by later appends and drops


def test_replayed_and_loaded_rows_read_whole_and_are_sealed_by_later_appends(
    small_chunks: None,
) -> None:
    # Journal replay and a snapshot load add rows in bulk, as live rows (no copy
    # at start-up); a big read seals those it sends, later appends the rest, one
    # chunk per append.
    seqs = list(range(1, 301))
    rows = [encode_row(s, b'"%s"' % (b"r" * (s % 97))) for s in seqs]
    keys = [b"k%d" % s for s in seqs]
    replayed = MemoryStore()
    replayed.replay(
        iter(
            [
                ["b", "w", seqs[:150], keys[:150], rows[:150], 0],
                *(
                    ["a", "w", s, k, r, 0]
                    for s, k, r in zip(seqs[150:], keys[150:], rows[150:], strict=True)
                ),
            ]
        )
    )
    loaded = MemoryStore()
    loaded.import_state(iter(replayed.export_state()[0]), [])
    for store in (replayed, loaded):
        w = store._ws["w"]
        check_stream(w)
        assert not w.chunks  # all live after start-up
        assert store.read_now("w", 77, 100, 1 << 30).rows == rows[77:177]
        assert len(w.chunks) > 3  # a read of many live rows seals them first
        check_stream(w)
        assert store.read_now("w", 0, 10**6, 1 << 30).rows == rows
        assert store.read_now("w", 300, 1, 1).empty
        more = [b'"m%d"' % i for i in range(40)]

        async def go(store: MemoryStore = store, more: list[bytes] = more) -> list[int]:
            return [(await store.append("w", b, b))[0] for b in more]

        new = asyncio.run(go())
        check_stream(w)
        assert len(w.chunks) > 10
        want = rows + [encode_row(s, b) for s, b in zip(new, more, strict=True)]
        assert store.read_now("w", 0, 10**6, 1 << 30).rows == want
        assert store.read_now("w", 0, 10**6, 1 << 30).json() == expected(want)


def test_a_small_workspace_keeps_its_rows_as_row_objects(small_chunks: None) -> None:
    # Below 32 x CHUNK_MIN of rows nothing is sealed: no chunk can be more than
    # 1/32 of what its workspace holds.
    store = MemoryStore(Bounds(max_envelopes=20))

    async def go() -> None:
        for i in range(200):
            await store.append("w", b'"%s"' % (b"s" * 60), b"k%d" % i)

    asyncio.run(go())
    w = store._ws["w"]
    assert not w.chunks and len(w.live) == 20
    check_stream(w)
