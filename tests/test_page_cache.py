"""The read lane's page cache (issue 13): a read's whole answer is built once and
served to every reader who asks the same until the workspace changes.

Each change a page could show has a test that fails if its invalidation is
removed: the test warms the cache, makes the change, and checks that the next
answer is byte for byte what a fresh build gives (the cache emptied by hand).
Then the byte-identical answer with and without the cache for the Hive fixtures,
in process and from a real relay process, and the gate: access checks and the
header limit still run for every cached read.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

import relay.store.memory
from relay.store import journal as journal_mod
from relay.store.base import (
    ENVELOPE_OVERHEAD,
    Bounds,
    encode_row,
    row_seq,
    workspace_charge,
)
from relay.store.memory import PAGE_CACHE_ENTRIES, MemoryStore
from relay.store.snapshot import JournalConfig, Snapshotter
from tests.relayproc import RelayProcess, assert_quiet_log
from tests.support import FakeTime, make_client

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hive_envelopes"
HIVE_BODIES = sorted(FIXTURES.glob("*.json"))
WS = "page-cache-ws"
# What uvicorn or the test client set per answer, not part of what the relay built.
PER_ANSWER = {"date", "server"}

Answer = tuple[int, list[tuple[str, str]], bytes]


def url(ws: str, query: str) -> str:
    return f"/v1/workspaces/{ws}/envelopes?{query}"


def get(c: TestClient, ws: str, query: str, **headers: str) -> Answer:
    r = c.get(url(ws, query), headers=headers)
    kept = [(k, v) for k, v in r.headers.multi_items() if k not in PER_ANSWER]
    return r.status_code, kept, r.content


def store_of(c: TestClient) -> MemoryStore:
    store = c.app.state.relay.store  # type: ignore[attr-defined]
    assert isinstance(store, MemoryStore)
    return store


def warm(c: TestClient, ws: str, query: str) -> Answer:
    """Read twice: the first builds and caches the answer, the second is served from it."""
    first = get(c, ws, query)
    assert first[0] == 200
    assert store_of(c).cached_page(ws, query.encode()) is not None, "the read was not cached"
    assert get(c, ws, query) == first
    return first


def assert_fresh(c: TestClient, ws: str, query: str) -> Answer:
    """The next answer equals a fresh build of it (the cache emptied by hand)."""
    served = get(c, ws, query)
    store_of(c)._drop_all_pages()
    assert get(c, ws, query) == served
    return served


def push(c: TestClient, ws: str, body: bytes) -> int:
    r = c.post(f"/v1/workspaces/{ws}/envelopes", content=body)
    assert r.status_code == 200, r.text
    return int(r.json()["seq"])


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def test_an_append_drops_the_cached_pages(client: TestClient) -> None:
    for i in range(3):
        push(client, WS, b'{"i":%d}' % i)
    before = warm(client, WS, "after=0")
    seq = push(client, WS, b'{"i":3}')
    after = assert_fresh(client, WS, "after=0")
    assert after != before and b'"seq":%d' % seq in after[2]


def test_a_batch_drops_the_cached_pages(client: TestClient) -> None:
    push(client, WS, b"1")
    before = warm(client, WS, "after=0&limit=10")
    r = client.post(f"/v1/workspaces/{WS}/envelopes/batch", content=b"[2,3]")
    assert r.status_code == 200, r.text
    after = assert_fresh(client, WS, "after=0&limit=10")
    assert after != before and after[2].count(b'"seq"') == 3


def test_a_retention_drop_by_the_sweep_drops_the_cached_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeTime()
    monkeypatch.setattr(relay.store.memory, "time", clock)
    with make_client(retention_days=1) as c:
        old = push(c, WS, b'"old"')
        clock.offset += 0.75 * 86400
        push(c, WS, b'"new"')
        before = warm(c, WS, "after=0")
        clock.offset += 0.5 * 86400  # old is 1.25 days old: the sweep drops it
        store_of(c).sweep()
        after = assert_fresh(c, WS, "after=0")
        assert after != before
        assert ("x-relay-gap", "true") in after[1]
        assert b'"seq":%d' % old not in after[2]


def test_a_count_cap_drop_drops_the_pages(client: TestClient) -> None:
    """The cap drops rows while an append runs; here the drop alone, so the test
    fails if the drop itself stops dropping the pages."""
    store = store_of(client)
    push(client, WS, b"1")
    push(client, WS, b"2")
    warm(client, WS, "after=0")
    store._drop_local(store._ws[WS], 1)
    after = assert_fresh(client, WS, "after=0")
    assert after[2].count(b'"seq"') == 1


def test_a_budget_eviction_for_another_workspace_drops_the_pages() -> None:
    body = b'"' + b"x" * 2000 + b'"'
    # Room for the two workspaces and three such envelopes: "b"'s second push
    # evicts the oldest envelope relay-wide, one of "a"'s.
    envelope = len(body) + 40 + 32 + ENVELOPE_OVERHEAD
    store = MemoryStore(
        Bounds(max_bytes=workspace_charge("a") * 2 + envelope * 3 + 100), page_cache_bytes=1 << 20
    )
    with make_client(store=store) as c:
        push(c, "a", body)
        push(c, "a", body.replace(b"x", b"y"))
        before = warm(c, "a", "after=0")
        push(c, "b", body.replace(b"x", b"1"))
        assert get(c, "a", "after=0") == before  # nothing of "a" changed yet: still cached
        push(c, "b", body.replace(b"x", b"2"))
        after = assert_fresh(c, "a", "after=0")
        assert after != before, "nothing of a was evicted: the test's budget is wrong"
        assert after[2].count(b'"seq"') == 1


def test_a_new_epoch_drops_every_cached_page(client: TestClient) -> None:
    """A restore from a snapshot (or an unclean stop) adopts a new epoch; every
    answer names it."""
    push(client, WS, b"1")
    push(client, "other", b"1")
    warm(client, WS, "after=0")
    warm(client, "other", "after=0")
    store_of(client).adopt_epoch("e-after-restore")
    for ws in (WS, "other"):
        assert ("x-relay-epoch", "e-after-restore") in assert_fresh(client, ws, "after=0")[1]


def test_a_moved_drop_horizon_from_a_replayed_record_drops_the_pages(client: TestClient) -> None:
    store = store_of(client)
    seq = push(client, WS, b"1")
    warm(client, WS, "after=0")
    # A "d" record below every retained row: no row goes, the drop horizon moves.
    store.replay(iter([["d", WS, seq - 1]]))
    after = assert_fresh(client, WS, "after=0")
    assert ("x-relay-gap", "true") in after[1]


def test_a_freed_workspace_gives_its_pages_back(client: TestClient) -> None:
    store = store_of(client)
    client.post(f"/v1/workspaces/{WS}/envelopes/batch", content=b"[1]")
    warm(client, WS, "after=0")
    used = store.page_cache_used
    assert used > 0
    store._drop_local(store._ws[WS], 1)
    warm(client, WS, "after=0")
    store._forget(WS)
    assert store.page_cache_used == 0 and not store._paged
    assert get(client, WS, "after=0")[2] == b"[]"


class HeldSync:
    """Each fsync of the journal waits until the test lets it return."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = journal_mod.Journal._sync

        def held(journal: journal_mod.Journal, *chunks: Any) -> None:  # see test_journal
            self.entered.set()
            assert self.release.wait(10)
            real(journal, *chunks)

        monkeypatch.setattr(journal_mod.Journal, "_sync", held)


def test_the_durable_mark_moving_drops_the_pages_in_fsync_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page cached while a row waits for its fsync shows the workspace without it;
    when the row becomes durable that page must go."""

    def build(store: MemoryStore, key: bytes) -> bytes:
        # What get_envelopes does: read, then cache the answer with no await between.
        cached = store.cached_page("w", key)
        if cached is not None:
            return bytes(cached)
        page = store.read_now("w", 0, 100, 1 << 20)
        body = page.json()
        store.cache_page("w", key, body, len(body))
        return body

    async def go() -> None:
        store = MemoryStore()
        snap = Snapshotter(store, str(tmp_path), 30, JournalConfig(mode="always"))
        snap.restore()
        await store.start()
        await store.append("w", b"1", b"a")  # durable before the fsync is held
        held = HeldSync(monkeypatch)
        pending = asyncio.ensure_future(store.append("w", b"2", b"b"))
        await asyncio.to_thread(held.entered.wait, 10)
        for _ in range(5):
            await asyncio.sleep(0)
        shown = build(store, b"q")
        assert shown.count(b'"seq"') == 1  # the undurable row is not shown
        assert store.cached_page("w", b"q") is not None
        held.release.set()
        seq, _ = await pending
        served = build(store, b"q")
        assert [row_seq(r) for r in store.read_now("w", 0, 100, 1 << 20).rows][-1] == seq
        assert served.count(b'"seq"') == 2, "a cached page hid a durable row"
        assert snap.journal is not None
        await snap.journal.close(clean=False)

    asyncio.run(go())


def test_hive_fixtures_answer_byte_for_byte_the_same_with_and_without_the_cache() -> None:
    bodies = [p.read_bytes() for p in HIVE_BODIES]
    assert bodies, "no Hive fixtures"
    uncached = MemoryStore(page_cache_bytes=0)
    with make_client() as cached_client, make_client(store=uncached) as plain:
        for body in bodies:
            push(cached_client, WS, body)
            push(plain, WS, body)
        for query in ("after=0", "after=0&limit=1", "limit=1&after=0&wait=5", "after=0&x=1"):
            miss = get(cached_client, WS, query)
            hit = get(cached_client, WS, query)
            assert hit == miss
            assert store_of(cached_client).cached_page(WS, query.encode()) is not None
            other = get(plain, WS, query)
            assert uncached.cached_page(WS, query.encode()) is None
            # The two relays assigned their own seqs (append times); all else is equal.
            assert [k for k, _ in other[1]] == [k for k, _ in hit[1]]
            assert other[2].count(b'"body":') == hit[2].count(b'"body":')
            for body in bodies[: hit[2].count(b'"body":')]:
                assert body in hit[2] and body in other[2]


def test_a_real_relay_serves_a_cached_answer_identical_to_the_first() -> None:
    with RelayProcess() as proc, httpx.Client(base_url=proc.url) as c:
        for p in HIVE_BODIES:
            assert c.post(f"/v1/workspaces/{WS}/envelopes", content=p.read_bytes()).is_success
        answers = []
        for _ in range(3):
            r = c.get(url(WS, "after=0"))
            kept = [h for h in r.headers.multi_items() if h[0] not in PER_ANSWER]
            answers.append((r.status_code, kept, r.content))
        assert answers[0] == answers[1] == answers[2]
        head = c.head(url(WS, "after=0"))
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(answers[0][2]))
        seq = int(c.post(f"/v1/workspaces/{WS}/envelopes", content=b'{"n":1}').json()["seq"])
        assert b'"seq":%d' % seq in c.get(url(WS, "after=0")).content
    # One access line per request, cached or not (all written by the clean stop).
    assert proc.logs().count("route=/v1/workspaces/{ws}/envelopes") == len(HIVE_BODIES) + 3 + 1 + 2


def test_every_cached_read_still_passes_the_access_check_and_the_header_limit() -> None:
    with make_client(access_tokens="good-token") as c:
        auth = {"Authorization": "Bearer good-token"}
        r = c.post(f"/v1/workspaces/{WS}/envelopes", content=b"1", headers=auth)
        assert r.status_code == 200
        first = get(c, WS, "after=0", **auth)
        assert first[0] == 200
        assert store_of(c).cached_page(WS, b"after=0") is not None
        assert get(c, WS, "after=0", **auth) == first
        assert get(c, WS, "after=0")[0] == 401
        assert get(c, WS, "after=0", Authorization="Bearer wrong")[0] == 401
        assert get(c, WS, "after=0", **auth, X_Pad="p" * 20_000)[0] == 431
        assert get(c, WS, "after=0", **auth) == first


def test_the_cache_is_bounded_per_workspace_and_relay_wide(client: TestClient) -> None:
    store = store_of(client)
    assert MemoryStore(Bounds(max_bytes=64 << 20)).page_cache_bytes == 8 << 20
    push(client, WS, b"1")
    for i in range(3 * PAGE_CACHE_ENTRIES):
        get(client, WS, f"after=0&bust={i}")
    pages: Any = store._ws[WS].pages
    assert pages is not None and len(pages) == PAGE_CACHE_ENTRIES
    assert store.page_cache_used == sum(size for _, size in pages.values())
    small = MemoryStore(page_cache_bytes=64 * 1024)
    with make_client(store=small) as c:
        for n in range(20):
            push(c, f"w{n}", b'"' + b"z" * 3000 + b'"')
            get(c, f"w{n}", "after=0")
            assert small.page_cache_used <= 64 * 1024
        assert len(small._paged) < 20  # the first cached workspaces gave theirs up
        assert get(c, "w0", "after=0")[0] == 200


def test_a_catch_up_page_from_a_real_relay_is_the_same_cached_or_not() -> None:
    """A big page (400 rows of 1 KiB) from a real relay: the first answer (built),
    the second (cached), and another cursor's (built) are each one join of the
    rows with the right Content-Length; HEAD sends the head alone."""
    pad = "q" * 1000
    with RelayProcess() as proc, httpx.Client(base_url=proc.url, timeout=30) as c:
        batch = "[" + ",".join('{"n":%d,"p":"%s"}' % (i, pad) for i in range(400)) + "]"
        r = c.post(f"/v1/workspaces/{WS}/envelopes/batch", content=batch)
        assert r.status_code == 200, r.text
        seqs = r.json()["seqs"]
        first = c.get(url(WS, "after=0&limit=1000"))
        again = c.get(url(WS, "after=0&limit=1000"))
        other = c.get(url(WS, "after=1&limit=1000"))
        head = c.head(url(WS, "after=0&limit=1000"))
    rows = [encode_row(s, b'{"n":%d,"p":"%s"}' % (i, pad.encode())) for i, s in enumerate(seqs)]
    expected = b"[" + b",".join(rows) + b"]"
    for r in (first, again, other):
        assert r.status_code == 200
        assert r.content == expected
        assert r.headers["content-length"] == str(len(expected))
    assert [(k, v) for k, v in first.headers.multi_items() if k not in PER_ANSWER] == [
        (k, v) for k, v in again.headers.multi_items() if k not in PER_ANSWER
    ]
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == first.headers["content-length"]
    assert_quiet_log(proc.logs())


def test_metrics_show_what_the_page_cache_holds(client: TestClient) -> None:
    def gauge() -> float:
        text = client.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("hive_relay_page_cache_bytes "))
        return float(line.split()[1])

    assert gauge() == 0
    push(client, WS, b"1")
    warm(client, WS, "after=0")
    assert gauge() == store_of(client).page_cache_used > 0
    push(client, WS, b"2")
    assert gauge() == 0


def test_a_cached_read_gets_cors_headers_without_changing_the_cached_answer() -> None:
    origin = "https://app.example"
    with make_client(cors_origins=origin) as c:
        push(c, WS, b"1")
        plain = warm(c, WS, "after=0")
        assert not any(k.startswith("access-control-") for k, _ in plain[1])
        for _ in range(3):
            hit = get(c, WS, "after=0", Origin=origin)
            assert hit[0] == 200 and hit[2] == plain[2]
            assert ("access-control-allow-origin", origin) in hit[1]
            assert any(k == "access-control-expose-headers" for k, _ in hit[1])
        assert get(c, WS, "after=0") == plain  # the cached header list was not edited
