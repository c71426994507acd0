"""Properties of the memory store, checked against a tiny reference model.

The model is the obvious implementation (a list of (seq, body, key) per
workspace); hypothesis drives both with the same operations and compares.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay.store.base import ENVELOPE_OVERHEAD, Bounds, row_body, row_seq, workspace_charge
from relay.store.memory import MemoryStore
from relay.store.snapshot import read_snapshot, write_snapshot

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hive_envelopes"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class Row(msgspec.Struct):
    seq: int
    body: msgspec.Raw


def page_rows(
    store: MemoryStore, ws: str, after: int = 0, limit: int = 10**9, max_bytes: int = 1 << 40
) -> list[tuple[int, bytes]]:
    page = store.read_now(ws, after, limit, max_bytes)
    return [(r.seq, bytes(r.body)) for r in msgspec.json.decode(page.json(), type=list[Row])]


def test_hive_bodies_round_trip_byte_for_byte() -> None:
    store = MemoryStore()
    bodies = [p.read_bytes() for p in sorted(FIXTURES.glob("*.json"))]
    assert len(bodies) == 2
    for body in bodies:
        run(store.append("w", body, hashlib.sha256(body).digest()))
    # Compare raw slices: a JSON parser would drop the files' trailing newline.
    rows = store.read_now("w", 0, 10, 1 << 20).rows
    assert [row_body(r) for r in rows] == bodies


def test_rows_are_encoded_once_and_parse_back() -> None:
    store = MemoryStore()
    seq, dup = run(store.append("w", b'{"a": [1, 2]}', b"k1"))
    assert not dup
    (row,) = store.read_now("w", 0, 10, 1 << 20).rows
    assert row_seq(row) == seq
    assert row_body(row) == b'{"a": [1, 2]}'
    assert json.loads(row) == {"seq": seq, "body": {"a": [1, 2]}}


class StoreModel(RuleBasedStateMachine):
    """Appends, batches, dedup, reads with any cursor/limit/byte cap, retention, restarts."""

    MAX = 7

    def __init__(self) -> None:
        super().__init__()
        self.bounds = Bounds(max_envelopes=self.MAX, max_bytes=1 << 30)
        self.store = MemoryStore(self.bounds)
        self.model: dict[str, list[tuple[int, bytes, bytes]]] = {}
        self.heads: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.epoch = self.store.epoch

    def _model_append(self, ws: str, body: bytes, key: bytes, seq: int, prune: bool = True) -> None:
        rows = self.model.setdefault(ws, [])
        rows.append((seq, body, key))
        assert seq > self.heads.get(ws, 0), "seq must strictly increase"
        self.heads[ws] = seq
        if prune:
            self._prune(ws)

    def _prune(self, ws: str) -> None:
        rows = self.model.get(ws, [])
        while len(rows) > self.MAX:
            self.dropped[ws] = rows.pop(0)[0]

    def _expect_dup(self, ws: str, key: bytes) -> int | None:
        for seq, _, k in self.model.get(ws, []):
            if k == key:
                return seq
        return None

    @rule(ws=st.sampled_from(["a", "b"]), n=st.integers(0, 12), keyed=st.booleans())
    def append(self, ws: str, n: int, keyed: bool) -> None:
        body = b'{"n":%d}' % n
        key = b"k%d" % n if keyed else hashlib.sha256(body).digest()
        expected = self._expect_dup(ws, key)
        seq, dup = run(self.store.append(ws, body, key))
        if expected is not None:
            assert dup and seq == expected
        else:
            assert not dup
            self._model_append(ws, body, key, seq)

    @rule(ws=st.sampled_from(["a", "b"]), ns=st.lists(st.integers(0, 12), min_size=1, max_size=5))
    def batch(self, ws: str, ns: list[int]) -> None:
        bodies = [b"[%d]" % n for n in ns]
        keys = [hashlib.sha256(b).digest() for b in bodies]
        results = run(self.store.append_batch(ws, bodies, keys))
        assert len(results) == len(bodies)
        for (seq, dup), body, key in zip(results, bodies, keys, strict=True):
            expected = self._expect_dup(ws, key)
            if expected is not None:
                assert dup and seq == expected
            else:
                assert not dup
                # A batch is retained whole first and pruned after, so a key seen
                # earlier in the same batch is a duplicate.
                self._model_append(ws, body, key, seq, prune=False)
        self._prune(ws)

    @rule(
        ws=st.sampled_from(["a", "b", "c"]),
        pick=st.integers(0, 20),
        limit=st.integers(1, 10),
        cap=st.integers(1, 60),
    )
    def read(self, ws: str, pick: int, limit: int, cap: int) -> None:
        rows = self.model.get(ws, [])
        cursors = [
            0,
            *(s for s, _, _ in rows),
            *(s + 1 for s, _, _ in rows),
            self.dropped.get(ws, 0),
        ]
        after = cursors[pick % len(cursors)]
        page = self.store.read_now(ws, after, limit, cap)
        want = [(s, b) for s, b, _ in rows if s > after]
        got = page_rows(self.store, ws, after, limit, cap)
        # Byte cap: stop once the page holds `cap` bytes of rows, but never return nothing.
        assert got == want[: len(got)]
        assert len(got) <= limit
        if want:
            assert got, "a non-empty remainder returns at least one row"
            total = sum(len(r) for r in page.rows)
            assert len(got) == 1 or total <= cap
        assert page.more == (len(got) < len(want))
        assert page.head == self.heads.get(ws, 0)
        assert page.oldest == (rows[0][0] if rows else 0)
        assert page.gap(after) == (after < self.dropped.get(ws, 0))

    @rule()
    def clean_restart(self) -> None:
        """Snapshot at shutdown, restore: everything kept, same epoch, seqs continue."""
        self._restart(clean=True)
        assert self.store.epoch == self.epoch

    @rule()
    def crash_restart(self) -> None:
        """A periodic snapshot restored after a crash: same rows, a new epoch."""
        self._restart(clean=False)
        assert self.store.epoch != self.epoch
        self.epoch = self.store.epoch

    @precondition(lambda self: self.heads)
    @rule()
    def restart_without_snapshot(self) -> None:
        """All history lost: new epoch, and the next seq is still above every old head."""
        old_heads = dict(self.heads)
        self.store = MemoryStore(self.bounds)
        assert self.store.epoch != self.epoch
        self.epoch = self.store.epoch
        for ws, head in old_heads.items():
            seq, _ = run(self.store.append(ws, b'"after-restart"', b"k-restart"))
            assert seq > head
        self.model = {}
        self.dropped = {}
        self.heads = {}
        for ws in old_heads:
            (row,) = self.store.read_now(ws, 0, 10, 1 << 20).rows
            self._model_append(ws, b'"after-restart"', b"k-restart", row_seq(row))

    def _restart(self, clean: bool) -> None:
        import tempfile

        from relay.store.snapshot import Snapshotter

        with tempfile.TemporaryDirectory() as tmp:
            snap = Snapshotter(self.store, tmp, 30)
            run(snap.write(clean=clean))
            self.store = MemoryStore(self.bounds)
            Snapshotter(self.store, tmp, 30).restore()

    @invariant()
    def stats_match(self) -> None:
        stats = self.store.stats_now()
        assert stats.envelopes == sum(len(r) for r in self.model.values())


TestStoreModel = pytest.mark.slow(StoreModel.TestCase)
TestStoreModel.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=60))
@settings(max_examples=50, deadline=None)
def test_global_budget_drops_oldest_relay_wide_first(sizes: list[bytes]) -> None:
    # Room for the two workspaces and a few envelopes, as charged (relay.store.base).
    budget = 2 * workspace_charge("a") + 4 * ENVELOPE_OVERHEAD
    store = MemoryStore(Bounds(max_envelopes=0, max_bytes=budget))
    appended: list[tuple[str, int]] = []
    for i, raw in enumerate(sizes):
        ws = "ab"[i % 2]
        body = msgspec.json.encode(raw.hex())
        seq, _ = run(store.append(ws, body, b"k%d" % i))
        appended.append((ws, seq))
        assert store.charged_now()[0] <= budget or store.stats_now().envelopes == 1
    retained = {(ws, s) for ws in "ab" for s, _ in page_rows(store, ws)}
    # What is retained is exactly a suffix of the relay-wide append order.
    suffix = appended[len(appended) - len(retained) :]
    assert set(suffix) == retained
    for ws in "ab":
        dropped_here = [s for w, s in appended[: len(appended) - len(retained)] if w == ws]
        page = store.read_now(ws, 0, 10, 1 << 20)
        assert page.dropped == (dropped_here[-1] if dropped_here else 0)


def test_retention_by_age_prunes_on_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.store.memory as memory

    clock = [1_800_000_000_000_000]
    monkeypatch.setattr(memory, "now_us", lambda: clock[0])
    store = MemoryStore(Bounds(retention_secs=60))
    old, _ = run(store.append("w", b"1", b"k1"))
    clock[0] += 30_000_000
    new, _ = run(store.append("w", b"2", b"k2"))
    clock[0] += 40_000_000  # the first is 70 s old, the second 40 s
    store.sweep()
    page = store.read_now("w", 0, 10, 1 << 20)
    assert [row_seq(r) for r in page.rows] == [new]
    assert page.dropped == old and page.gap(0) and not page.gap(old)


@pytest.mark.slow
def test_pruning_stays_amortized_at_the_cap() -> None:
    """Appending far past the cap keeps the log bounded (the dead prefix is cut)."""
    store = MemoryStore(Bounds(max_envelopes=100))
    for i in range(5000):
        run(store.append("w", b"%d" % i, b"k%d" % i))
    w = store._ws["w"]
    assert w.count == 100
    assert len(w.rows) <= 100 + 1024 + 1
    assert len(w.dedup) == 100
    assert len(store._order) <= 2 * 100 + 1024 + 1


def test_idle_empty_workspaces_are_freed_and_seqs_do_not_rewind() -> None:
    store = MemoryStore(Bounds(idle_workspace_secs=0.0, retention_secs=1e-6))
    seq, _ = run(store.append("w", b"1", b"k"))
    assert store.sweep() == 1
    assert store.stats_now().workspaces == 0
    again, _ = run(store.append("w", b"1", b"k"))
    assert again > seq


def test_listened_workspaces_are_not_freed() -> None:
    store = MemoryStore(Bounds(idle_workspace_secs=0.0))
    run(store.device_put("presence", "w", "d", b"1"))
    run(store.keyring_append("w2", b"1"))
    store._ws["w3"] = store._get("w3")
    assert store.sweep(lambda ws: ws == "w3") == 0


def test_snapshot_file_round_trip(tmp_path: Path) -> None:
    store = MemoryStore()
    run(store.append("w", b'{"x":1}', b"k"))
    run(store.keyring_append("w", b'{"version":1}'))
    run(store.device_put("presence", "w", "dev", b'{"on":true}'))
    code = run(store.pair_create("payload", 600))
    workspaces, pairs = store.export_state()
    header = {"format": "hive-relay-snapshot", "version": 1, "epoch": store.epoch, "clean": True}
    write_snapshot(tmp_path / "s", header, workspaces, pairs)
    got_header, got_ws, got_pairs = read_snapshot(tmp_path / "s")
    assert got_header["epoch"] == store.epoch
    assert got_ws[0].rows == workspaces[0].rows
    assert got_ws[0].keyring == [b'{"version":1}']
    assert got_pairs[0][0] == code


class _Counted(float):
    """A clock reading that counts every comparison made with it (or with a sum of it)."""

    compared = 0

    def _count(self, op: str, other: object) -> bool:
        _Counted.compared += 1
        result: bool = getattr(float, op)(self, other)
        return result

    def __add__(self, other: object) -> _Counted:
        return _Counted(float(self) + float(other))  # type: ignore[arg-type]

    __radd__ = __add__

    def __lt__(self, other: object) -> bool:
        return self._count("__lt__", other)

    def __le__(self, other: object) -> bool:
        return self._count("__le__", other)

    def __gt__(self, other: object) -> bool:
        return self._count("__gt__", other)

    def __ge__(self, other: object) -> bool:
        return self._count("__ge__", other)

    def __eq__(self, other: object) -> bool:
        return self._count("__eq__", other)

    def __ne__(self, other: object) -> bool:
        return self._count("__ne__", other)

    __hash__ = float.__hash__


def _expiry_work_per_create(monkeypatch: pytest.MonkeyPatch, held: int) -> float:
    """Expiry-time comparisons one pairing create costs with `held` live codes stored."""
    import relay.store.memory as memory

    clock = SimpleNamespace(time=lambda: _Counted(time.time()))
    monkeypatch.setattr(memory, "time", clock)
    store = MemoryStore(Bounds(max_pairings=held + 1000))
    for i in range(held):
        run(store.pair_create(f"p{i}", 3600))
    _Counted.compared = 0
    creates = 200
    for i in range(creates):
        run(store.pair_create(f"q{i}", 3600))
    return _Counted.compared / creates


@pytest.mark.slow
def test_pairing_expiry_cost_does_not_grow_with_the_codes_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A create used to compare the expiry of every stored code (5-7 ms near the
    100,000 cap); ordered by expiry, it looks at the codes that go, plus O(log n)."""
    few = _expiry_work_per_create(monkeypatch, 100)
    many = _expiry_work_per_create(monkeypatch, 20_000)
    assert few >= 1  # the counter sees the expiry check at all
    # 200 times the codes: at most a few more comparisons (log n), never 200 times more.
    assert many <= few + 20, (few, many)


def test_pairing_codes_expire_soonest_first_and_stay_resolvable_till_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import relay.store.memory as memory

    now = [1_800_000_000.0]
    clock = SimpleNamespace(
        time=lambda: now[0], time_ns=lambda: int(now[0] * 1e9), monotonic=time.monotonic
    )
    monkeypatch.setattr(memory, "time", clock)
    store = MemoryStore(Bounds(max_pairings=10))
    late = run(store.pair_create("late", 600))
    soon = run(store.pair_create("soon", 30))
    mid = run(store.pair_create("mid", 120))
    now[0] += 60
    assert run(store.pair_resolve(soon)) is None  # dropped on the read, then re-drawn below
    store.sweep()
    assert store.stats_now().pairings == 2
    assert [run(store.pair_resolve(c)) for c in (late, mid)] == ["late", "mid"]
    now[0] += 100
    store.sweep()
    assert store.stats_now().pairings == 1
    assert run(store.pair_resolve(late)) == "late"
    # A snapshot keeps the order: reloaded codes still expire when they should.
    workspaces, pairs = store.export_state()
    copy = MemoryStore(Bounds(max_pairings=10))
    copy.import_state(iter(workspaces), pairs)
    now[0] += 500
    copy.sweep()
    assert copy.stats_now().pairings == 0
    assert run(copy.pair_resolve(late)) is None
