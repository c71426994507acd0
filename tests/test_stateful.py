"""Every store against one tiny reference model, driven by hypothesis.

`tests/test_store_memory.py` model-checks the memory store's own internals (its
synchronous reads, snapshot files). This machine speaks only the `Store`
protocol, so the same rules run against the memory store and the Redis store:
appends and batches with dedup (by key and by body digest, within a batch and
against history), reads with every interesting cursor, limit and byte cap,
retention by count with the dropped horizon, keyring and device channels with
their bounds, pairing codes, and restarts — with the history kept (a clean
snapshot; a relay restarted on the same Redis), kept under a new epoch (a
periodic snapshot restored after a crash) or lost (no snapshot; a wiped Redis).

The model is the obvious implementation: per workspace a list of
(seq, body, key). After a restart that loses history, seqs must still rise
above every seq the workspace ever had, and the epoch must change.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from relay.store.base import PAIR_ALPHABET, Bounds, Page, StoreFull, row_body, row_seq
from relay.store.memory import MemoryStore
from tests.support import digest

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("HIVE_RELAY_STATEFUL_EXAMPLES", "40"))
STEPS = 30
BIG = 1 << 40
MAX_U64 = (1 << 64) - 1
BOUNDS = Bounds(
    max_envelopes=5,
    max_bytes=1 << 30,
    max_keyring=3,
    max_devices=2,
    max_side_bytes=48,
    max_pairings=1000,
)
WORKSPACES = ("a", "x.y:z@1~-_")
CHANNELS = ("presence", "candidates")


# ------------------------------------------------------------------ backends
class MemoryBackend:
    """Restarts through the snapshot file, as `python -m relay` does."""

    name = "memory"
    # kind -> (history kept, epoch kept)
    restarts = {"clean": (True, True), "crash": (True, False), "lost": (False, False)}

    async def open(self) -> Any:
        store = MemoryStore(BOUNDS)
        await store.start()
        return store

    async def restart(self, store: Any, kind: str) -> Any:
        from relay.store.snapshot import Snapshotter

        if kind == "lost":
            return await self.open()
        with tempfile.TemporaryDirectory() as tmp:
            await Snapshotter(store, tmp, 30).write(clean=kind == "clean")
            fresh = MemoryStore(BOUNDS)
            Snapshotter(fresh, tmp, 30).restore()
        await fresh.start()
        return fresh

    async def close(self, store: Any) -> None:
        await store.close()


class RedisBackend:
    """A relay restarted on the same Redis keeps everything; a wiped Redis loses it."""

    name = "redis"
    restarts = {"relay restart": (True, True), "redis wiped": (False, False)}

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> Any:
        from relay.store.redis import RedisStore
        from tests.redisproc import flush

        flush(self.url)
        store = RedisStore(self.url, BOUNDS)
        await store.start()
        return store

    async def restart(self, store: Any, kind: str) -> Any:
        from relay.store.redis import RedisStore
        from tests.redisproc import flush

        if kind == "redis wiped":
            flush(self.url)
            await store.read("a", 0, 1, 1)  # every read checks the epoch
            return store
        await store.close()
        fresh = RedisStore(self.url, BOUNDS)
        await fresh.start()
        return fresh

    async def close(self, store: Any) -> None:
        await store.close()


Backend = MemoryBackend | RedisBackend


# --------------------------------------------------------------------- model
def expected_page(
    rows: list[tuple[int, bytes, bytes]], after: int, limit: int, cap: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """The rows past `after`, at most `limit`, stopping before the row that would
    take the page past `cap` bytes of encoded rows — but never empty when rows remain."""
    rest = [(s, b) for s, b, _ in rows if s > after]
    out: list[tuple[int, bytes]] = []
    total = 0
    for seq, body in rest:
        size = len(b'{"seq":%d,"body":%b}' % (seq, body))
        if len(out) >= limit or (out and total + size > cap):
            break
        out.append((seq, body))
        total += size
    return out, len(out) < len(rest)


class StoreMachine(RuleBasedStateMachine):
    backend: Backend  # set by the test that runs the machine

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: Any = None
        self.rows: dict[str, list[tuple[int, bytes, bytes]]] = {}
        self.heads: dict[str, int] = {}  # highest seq of the current history
        self.ever: dict[str, int] = {}  # highest seq the workspace ever had
        self.dropped: dict[str, int] = {}
        self.keyring: dict[str, list[bytes]] = {}
        self.devices: dict[tuple[str, str], dict[str, bytes]] = {}
        self.pairs: dict[str, str] = {}
        self.epoch = ""
        self.probes = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize()
    def open_store(self) -> None:
        self.store = self.run(self.backend.open())
        self.epoch = self.store.epoch

    def teardown(self) -> None:
        if self.store is not None:
            self.run(self.backend.close(self.store))
        self.loop.close()

    # ------------------------------------------------------------- envelopes
    def _model_append(self, ws: str, seq: int, body: bytes, key: bytes) -> None:
        assert seq > self.heads.get(ws, 0), "seq must strictly increase"
        assert seq > self.ever.get(ws, 0), "seq must never rewind, even across lost history"
        self.rows.setdefault(ws, []).append((seq, body, key))
        self.heads[ws] = self.ever[ws] = seq

    def _prune(self, ws: str) -> None:
        rows = self.rows.get(ws, [])
        while len(rows) > BOUNDS.max_envelopes:
            self.dropped[ws] = rows.pop(0)[0]

    def _retained(self, ws: str, key: bytes) -> int | None:
        return next((s for s, _, k in self.rows.get(ws, []) if k == key), None)

    @rule(ws=st.sampled_from(WORKSPACES), n=st.integers(0, 9), keyed=st.booleans())
    def append(self, ws: str, n: int, keyed: bool) -> None:
        body = b'{"n":%d}' % n
        key = b"k%d" % n if keyed else digest(body)
        original = self._retained(ws, key)
        seq, dup = self.run(self.store.append(ws, body, key))
        if original is not None:
            assert (seq, dup) == (original, True)
        else:
            assert not dup
            self._model_append(ws, seq, body, key)
            self._prune(ws)

    @rule(
        ws=st.sampled_from(WORKSPACES),
        items=st.lists(st.tuples(st.integers(0, 9), st.booleans()), min_size=1, max_size=8),
    )
    def batch(self, ws: str, items: list[tuple[int, bool]]) -> None:
        bodies = [b"[%d]" % n for n, _ in items]
        keys = [
            b"k%d" % n if keyed else digest(b) for (n, keyed), b in zip(items, bodies, strict=True)
        ]
        results = self.run(self.store.append_batch(ws, bodies, keys))
        assert len(results) == len(bodies)
        for (seq, dup), body, key in zip(results, bodies, keys, strict=True):
            # A batch is retained whole, then pruned: a key seen earlier in the same
            # batch is a duplicate of that element.
            original = self._retained(ws, key)
            if original is not None:
                assert (seq, dup) == (original, True)
            else:
                assert not dup
                self._model_append(ws, seq, body, key)
        self._prune(ws)

    @rule(
        ws=st.sampled_from((*WORKSPACES, "never-used")),
        pick=st.integers(0, 40),
        limit=st.sampled_from((1, 2, 3, 7, BIG)),
        cap=st.sampled_from((1, 30, 60, 100, BIG)),
    )
    def read(self, ws: str, pick: int, limit: int, cap: int) -> None:
        rows = self.rows.get(ws, [])
        cursors = [
            0,
            1,
            *(s for s, _, _ in rows),
            *(s - 1 for s, _, _ in rows),
            *(s + 1 for s, _, _ in rows),
            self.dropped.get(ws, 0),
            self.ever.get(ws, 0),
            MAX_U64,
        ]
        after = cursors[pick % len(cursors)]
        page: Page = self.run(self.store.read(ws, after, limit, cap))
        want, more = expected_page(rows, after, limit, cap)
        assert [(row_seq(r), row_body(r)) for r in page.rows] == want
        assert page.more == more
        assert page.head == self.heads.get(ws, 0)
        assert page.oldest == (rows[0][0] if rows else 0)
        assert page.gap(after) == (after < self.dropped.get(ws, 0))

    # --------------------------------------------------------- side channels
    @rule(ws=st.sampled_from(WORKSPACES), n=st.integers(0, 99), big=st.booleans())
    def keyring_append(self, ws: str, n: int, big: bool) -> None:
        blob = b'"%s"' % (b"x" * BOUNDS.max_side_bytes) if big else b'{"v":%d}' % n
        ring = self.keyring.setdefault(ws, [])
        if big or len(ring) >= BOUNDS.max_keyring:
            with pytest.raises(StoreFull) as full:
                self.run(self.store.keyring_append(ws, blob))
            assert full.value.code == ("too_large" if big else "keyring_full")
        else:
            self.run(self.store.keyring_append(ws, blob))
            ring.append(blob)

    @rule(
        channel=st.sampled_from(CHANNELS),
        ws=st.sampled_from(WORKSPACES),
        device=st.sampled_from(("d1", "d2", "d3", "dé")),
        n=st.integers(0, 9),
        big=st.booleans(),
    )
    def device_put(self, channel: str, ws: str, device: str, n: int, big: bool) -> None:
        data = b"x" * (BOUNDS.max_side_bytes + 1) if big else b"[%d]" % n
        entries = self.devices.setdefault((channel, ws), {})
        if big:
            with pytest.raises(StoreFull) as full:
                self.run(self.store.device_put(channel, ws, device, data))
            assert full.value.code == "too_large"
        elif device not in entries and len(entries) >= BOUNDS.max_devices:
            with pytest.raises(StoreFull) as full:
                self.run(self.store.device_put(channel, ws, device, data))
            assert full.value.code == "too_many_devices"
        else:
            self.run(self.store.device_put(channel, ws, device, data))
            entries[device] = data

    @rule(payload=st.text(min_size=1, max_size=20))
    def pair_create(self, payload: str) -> None:
        code = self.run(self.store.pair_create(payload, 600))
        assert len(code) == 6 and set(code) <= set(PAIR_ALPHABET)
        assert code not in self.pairs
        self.pairs[code] = payload

    @rule(pick=st.integers(0, 50))
    def pair_resolve(self, pick: int) -> None:
        codes = sorted(self.pairs)
        code = codes[pick % len(codes)] if codes and pick % 3 else "ZZZZZ0"
        assert self.run(self.store.pair_resolve(code)) == self.pairs.get(code)

    # --------------------------------------------------------------- restarts
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(sorted(self.backend.restarts)), label="restart")
        kept, same_epoch = self.backend.restarts[kind]
        self.store = self.run(self.backend.restart(self.store, kind))
        if same_epoch:
            assert self.store.epoch == self.epoch, kind
        else:
            assert self.store.epoch != self.epoch, f"{kind}: history may be lost"
        self.epoch = self.store.epoch
        if not kept:
            self.rows, self.heads, self.dropped = {}, {}, {}
            self.keyring, self.devices, self.pairs = {}, {}, {}

    @precondition(lambda self: any(self.ever.values()))
    @rule(ws=st.sampled_from(WORKSPACES))
    def fresh_append(self, ws: str) -> None:
        """A never-seen key lands above everything the workspace ever had."""
        self.probes += 1
        body, key = b'"probe-%d"' % self.probes, b"probe-%d" % self.probes
        seq, dup = self.run(self.store.append(ws, body, key))
        assert not dup
        self._model_append(ws, seq, body, key)
        self._prune(ws)

    # ------------------------------------------------------------- invariants
    @invariant()
    def everything_matches(self) -> None:
        if self.store is None:
            return
        for ws in WORKSPACES:
            page = self.run(self.store.read(ws, 0, BIG, BIG))
            got = [(row_seq(r), row_body(r)) for r in page.rows]
            assert got == [(s, b) for s, b, _ in self.rows.get(ws, [])], ws
            assert self.run(self.store.keyring_list(ws)) == self.keyring.get(ws, [])
            for channel in CHANNELS:
                entries = dict(self.run(self.store.device_map(channel, ws)))
                assert entries == self.devices.get((channel, ws), {}), (channel, ws)
        assert self.store.epoch == self.epoch


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def run_machine(backend: Backend) -> None:
    machine: Callable[[], StoreMachine] = type(
        f"{backend.name.title()}StoreMachine", (StoreMachine,), {"backend": backend}
    )
    run_state_machine_as_test(machine, settings=SETTINGS)


def test_memory_store_matches_the_model() -> None:
    run_machine(MemoryBackend())


@pytest.fixture(scope="module")
def redis_server_url() -> Iterator[str]:
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from tests.redisproc import redis_url

    with redis_url() as url:
        yield url


def test_redis_store_matches_the_model(redis_server_url: str) -> None:
    run_machine(RedisBackend(redis_server_url))
