"""The memory store's byte accounting (issue 18 §3): every item is charged what it
costs in memory, so HIVE_RELAY_MAX_BYTES bounds what the store really holds.

The charges (relay.store.base) are checked two ways: exactly, item by item, and
against the Python heap as tracemalloc measures it, for the floods the security
review used (tiny envelopes, presence entries in many workspaces with 200-character
ids). tests/test_hostile_budgets.py checks the same bound on a real process's RSS.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import tracemalloc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.store.memory
from relay.errors import store_error_status
from relay.store.base import (
    BLOB_OVERHEAD,
    ENVELOPE_OVERHEAD,
    Bounds,
    StoreFull,
    device_charge,
    encode_row,
    workspace_charge,
)
from relay.store.memory import SWEEP_STEP, MemoryStore
from relay.store.snapshot import read_snapshot, write_snapshot

BIG = 1 << 40


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def envelope_charge(seq: int, body: bytes, key: bytes) -> int:
    return len(encode_row(seq, body)) + len(key) + ENVELOPE_OVERHEAD


class Clock:
    """Stands in for the `time` module inside relay.store.memory."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return int(self.now * 1e9)


def check_books(store: MemoryStore) -> None:
    """The running totals equal the charges recomputed from what the store holds."""
    workspaces = bare = envelopes = side = 0
    for name, w in store._ws.items():
        charge = workspace_charge(name)
        workspaces += charge
        bare += 0 if w.has_side() else charge
        for k in range(w.start, len(w.rows)):
            envelopes += len(w.rows[k] or b"") + len(w.keys[k] or b"") + ENVELOPE_OVERHEAD
        side += sum(len(b) + BLOB_OVERHEAD for b in w.keyring)
        for entries in (w.presence, w.candidates):
            side += sum(device_charge(d, data) for d, (data, _) in entries.items())
    assert store.charged_now() == (workspaces + envelopes, side)
    assert (store._ws_bytes, store._bare_bytes) == (workspaces, bare)


def test_each_item_is_charged_its_bytes_and_its_overhead() -> None:
    store = MemoryStore(Bounds(max_bytes=BIG, max_envelopes=2))
    assert store.charged_now() == (0, 0)
    key = hashlib.sha256(b"1").digest()
    seq, _ = run(store.append("ws-1", b"1", key))
    one = workspace_charge("ws-1") + envelope_charge(seq, b"1", key)
    assert store.charged_now() == (one, 0)
    # A duplicate costs nothing.
    run(store.append("ws-1", b"1", key))
    assert store.charged_now() == (one, 0)
    # A batch is charged as the same envelopes pushed one by one.
    results = run(store.append_batch("ws-1", [b"22", b"333"], [b"kb", b"kc"]))
    (s2, _), (s3, _) = results
    # max_envelopes=2 dropped the first; its charge went with it.
    want = (
        workspace_charge("ws-1")
        + envelope_charge(s2, b"22", b"kb")
        + envelope_charge(s3, b"333", b"kc")
    )
    assert store.charged_now() == (want, 0)
    run(store.device_put("presence", "ws-2", "device-a", b"null"))
    run(store.keyring_append("ws-2", b'"blob"'))
    side = device_charge("device-a", b"null") + len(b'"blob"') + BLOB_OVERHEAD
    assert store.charged_now() == (want + workspace_charge("ws-2"), side)
    # Replacing an entry charges the difference only.
    run(store.device_put("presence", "ws-2", "device-a", b'{"a":1}'))
    side += len(b'{"a":1}') - len(b"null")
    assert store.charged_now()[1] == side
    check_books(store)


def test_charges_survive_a_snapshot_round_trip(tmp_path: Path) -> None:
    store = MemoryStore(Bounds(max_bytes=BIG))
    for i in range(5):
        run(store.append(f"w{i % 2}", b"%d" % i, b"k%d" % i))
    run(store.device_put("candidates", "w0", "d", b"[1]"))
    run(store.keyring_append("w3", b"7"))
    path = tmp_path / "snap"
    workspaces, pairs = store.export_state()
    header = {"format": "hive-relay-snapshot", "version": 1, "epoch": store.epoch, "clean": True}
    write_snapshot(path, header, workspaces, pairs)
    _, got_ws, got_pairs = read_snapshot(path)
    loaded = MemoryStore(Bounds(max_bytes=BIG))
    loaded.import_state(iter(got_ws), got_pairs)
    assert loaded.charged_now() == store.charged_now() != (0, 0)
    check_books(loaded)


def test_expiry_and_idle_freeing_give_the_charges_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(relay.store.memory, "time", clock)
    store = MemoryStore(Bounds(max_bytes=BIG, presence_ttl=10, idle_workspace_secs=60))
    for i in range(3):
        run(store.device_put("presence", f"p{i}", "d" * 200, b"null"))
    assert store.charged_now()[1] == 3 * device_charge("d" * 200, b"null")
    clock.now += 11
    store.sweep()
    assert store.charged_now() == (3 * workspace_charge("p0"), 0)
    check_books(store)
    clock.now += 61
    assert store.sweep() == 3
    assert store.charged_now() == (0, 0)
    check_books(store)


def test_new_workspaces_past_the_budget_free_empty_ones_first() -> None:
    # Room for about ten workspaces: empty ones are freed to make room, the oldest
    # envelopes go next, and once every workspace holds side-channel data a new one
    # is refused (413 relay_full) and nothing changes.
    budget = 10 * workspace_charge("w-00")
    # The newest envelope is always kept (it was just acknowledged), even past the budget.
    newest = envelope_charge(1 << 62, b"1", b"k")
    store = MemoryStore(Bounds(max_bytes=budget))
    listened = {"w-00"}
    store.set_listened(lambda ws: ws in listened)
    for i in range(40):
        run(store.append(f"w-{i:02d}", b"1", b"k"))
        assert store.charged_now()[0] <= budget + newest
        assert store.stats_now().workspaces <= 10
    # Empty ones were freed and envelopes evicted relay-wide; w-00 keeps its listener.
    assert "w-00" in store._ws and "w-39" in store._ws
    check_books(store)
    # Workspaces that hold side data are never freed to make room.
    full = MemoryStore(Bounds(max_bytes=budget))
    made = 0
    with pytest.raises(StoreFull) as refused:
        for made in range(100):
            run(full.device_put("presence", f"w-{made:02d}", "d", b"1"))
    assert refused.value.code == "relay_full" and store_error_status(refused.value) == 413
    before = (full.charged_now(), full.stats_now())
    with pytest.raises(StoreFull):
        run(full.append("another", b"1", b"k"))
    with pytest.raises(StoreFull):
        run(full.keyring_append("yet-another", b"1"))
    assert (full.charged_now(), full.stats_now()) == before
    assert 5 <= made <= 10 and full.charged_now()[0] <= budget
    # An existing workspace still takes writes.
    run(full.append("w-00", b"2", b"k2"))
    check_books(full)


def test_a_refused_new_workspace_evicts_nothing() -> None:
    # When evicting every envelope could not make room (the workspaces hold side
    # data), a new workspace is refused before anything is evicted.
    budget = 10 * workspace_charge("w-00")
    store = MemoryStore(Bounds(max_bytes=budget))
    with pytest.raises(StoreFull):
        for i in range(100):
            run(store.device_put("presence", f"w-{i:02d}", "d", b"1"))
    run(store.append("w-00", b"1", b"k1"))
    before = (store.charged_now(), store.stats_now(), store.read_now("w-00", 0, 10, BIG).rows)
    assert before[1].envelopes == 1
    with pytest.raises(StoreFull) as refused:
        run(store.append("new", b"2", b"k2"))
    assert refused.value.code == "relay_full"
    after = (store.charged_now(), store.stats_now(), store.read_now("w-00", 0, 10, BIG).rows)
    assert after == before
    check_books(store)


def test_a_refused_side_write_leaves_no_workspace_behind() -> None:
    store = MemoryStore(Bounds(max_bytes=BIG, max_side_bytes=16))
    with pytest.raises(StoreFull):
        run(store.device_put("presence", "fresh", "d", b"x" * 17))
    with pytest.raises(StoreFull):
        run(store.keyring_append("fresh", b"x" * 17))
    assert store.stats_now().workspaces == 0
    assert store.charged_now() == (0, 0)


def test_the_sweep_runs_in_bounded_steps() -> None:
    store = MemoryStore(Bounds(max_bytes=BIG, idle_workspace_secs=0.0))
    n = 5 * SWEEP_STEP

    async def fill() -> None:
        for i in range(n):
            await store.device_put("presence", f"w{i}", "d", b"1")

    run(fill())
    steps = list(store.sweep_steps())
    assert len(steps) >= n // SWEEP_STEP
    # The store may change between steps; a workspace freed meanwhile is skipped.
    gen = store.sweep_steps()
    next(gen)
    next(gen)
    store._ws.pop("w4999")
    for _ in gen:
        pass


Fill = Callable[[MemoryStore], Coroutine[Any, Any, None]]


def _heap_growth(fill: Fill, store: MemoryStore) -> int:
    async def measured() -> int:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await fill(store)
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    return int(run(measured()))


async def _tiny_envelopes(store: MemoryStore) -> None:
    for i in range(20_000):
        body = b"%d" % i
        await store.append(f"w{i % 50}", body, hashlib.sha256(body).digest())


async def _presence_in_many_workspaces(store: MemoryStore) -> None:
    for i in range(5_000):
        await store.device_put("presence", f"{i:06d}" + "x" * 194, "d", b"null")


async def _tiny_batches(store: MemoryStore) -> None:
    for j in range(20):
        bodies = [b"%d" % (j * 1000 + i) for i in range(1000)]
        await store.append_batch("w", bodies, [hashlib.sha256(b).digest() for b in bodies])


@pytest.mark.slow
@pytest.mark.parametrize(
    "fill", [_tiny_envelopes, _presence_in_many_workspaces, _tiny_batches], ids=lambda f: f.__name__
)
def test_the_charges_match_the_heap(fill: Fill) -> None:
    # Before issue 18 a tiny envelope was charged its row only (about a seventh of
    # its cost) and a presence entry its data (4 bytes of about 1,200).
    store = MemoryStore(Bounds(max_bytes=BIG, max_envelopes=0))
    heap = _heap_growth(fill, store)
    charged = sum(store.charged_now())
    assert 0.7 * heap <= charged <= 1.5 * heap, (charged, heap)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["append", "batch", "presence", "candidates", "keyring", "tick", "sweep"]),
        st.integers(0, 7),
        st.binary(min_size=0, max_size=40),
    ),
    max_size=80,
)


@given(OPS, st.sampled_from([4, 8, 30]))
@settings(max_examples=60, deadline=None)
def test_the_books_balance_under_any_mix_of_writes(
    ops: list[tuple[str, int, bytes]], room: int
) -> None:
    clock = Clock()
    with mock.patch.object(relay.store.memory, "time", clock):
        budget = room * workspace_charge("w-0")
        store = MemoryStore(
            Bounds(max_bytes=budget, presence_ttl=5, idle_workspace_secs=10, max_keyring=3)
        )
        for n, (op, i, data) in enumerate(ops):
            ws = f"w-{i}"
            body = b'"%s"' % data.hex().encode()
            try:
                if op == "append":
                    run(store.append(ws, body, b"k%d" % n))
                elif op == "batch":
                    run(store.append_batch(ws, [body, b"%d" % n], [b"a%d" % n, b"b%d" % n]))
                elif op in ("presence", "candidates"):
                    run(store.device_put(op, ws, f"d{len(data) % 3}", body))
                elif op == "keyring":
                    run(store.keyring_append(ws, body))
                elif op == "tick":
                    clock.now += i * 2
                else:
                    store.sweep()
            except StoreFull:
                pass
            check_books(store)
            assert store.charged_now()[1] <= budget // 4
