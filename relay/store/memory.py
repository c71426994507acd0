"""The in-memory store: the default, one process, no locks (one event loop).

Per workspace the log is three parallel sequences indexed from `start`:
`seqs` and `cum` (cumulative row bytes) are compact `array('q')`s so a cursor
read is two binary searches (O(log n + k)); `keys` holds each row's dedup key so
pruning can forget it. Pruning only advances `start` and clears the key; the dead
prefix is cut off once it is half the log, so append stays amortized O(1) even at
the retention cap.

The rows themselves, each encoded once at append, form one stream per
workspace: the rows end to end, each followed by a comma. Its older part is
sealed `chunks` (immutable bytes of whole rows, `bases` holding where each
starts in the stream); its newest rows are `live`, a list, sealed into a chunk
once they pass 1/32 of the workspace's retained row bytes (at most CHUNK_MAX;
a workspace whose 1/32 is below CHUNK_MIN, under 1 MiB of rows, keeps every
row live, as rows always were, so a chunk is never more than 1/32 of what its
workspace holds). A page of rows is one contiguous range of the
stream, so its JSON array is "[", memoryviews of a few chunks, the live rows
joined, "]": pieces the relay's server writes with one vectored send
(relay.wire), with no join of thousands of row objects. A chunk whose rows are
all dropped is freed (never cut: copies of odd sizes fragment the heap), so
dropped rows hold at most one chunk, 1/32 of the workspace's rows (a sealed row
saves the ~57 bytes of its own object, which covers that for rows up to about
1.8 KB); dropped live rows go at once. Replay and snapshot load add
rows live (no copy at start-up); appends seal them a chunk at a time, and a read
of more than CHUNK_MAX bytes of live rows seals those first.

Durability gate: with a journal attached (relay.store.journal, with
HIVE_RELAY_DATA_DIR), every change is also handed to the journal as a record,
and an answer waits until the journal reports that record safe. Each workspace
keeps `durable`, the highest seq whose record is safe: reads (and so
long-polls and live replays) stop at it, and the append listener (live
wake-ups) hears of rows only when they pass it (`_release`). That mark is the
one place visibility is decided; without a journal it is the head.

Seqs follow the rule in relay.store.base (`next_seq`), across restarts with or
without a snapshot.

Page cache: a read's whole answer (its body and headers, built by the API) is
kept per workspace, keyed by the request's query string, and served to every
reader who asks the same until the workspace changes (after a nudge every device
of a workspace asks for the same newest page). Every change a page could show
drops the workspace's pages (`_drop_pages`): an append or batch, any row dropped
(count cap, age, budget eviction, replayed drop), a moved drop horizon, a moved
durable mark, a freed workspace; a new epoch drops them all. (Loading a snapshot
and attaching the journal happen at start-up, before any read.) The cache holds
at most PAGE_CACHE_BYTES (32 MiB) relay-wide, or an eighth of a smaller
HIVE_RELAY_MAX_BYTES: a fixed cap on top of the budget, not charged to it; and
PAGE_CACHE_ENTRIES per workspace.

The global byte budget evicts the oldest envelopes relay-wide: `_order` holds a
reference to the workspace of every appended row in append order. A workspace
that prunes rows itself (count or age) counts them in `stale`, and the eviction
walk skips that many of its entries; the deque is compacted when mostly stale.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from relay.store.base import (
    BLOB_OVERHEAD,
    DEVICE_CHANNELS,
    ENVELOPE_OVERHEAD,
    AppendListener,
    Bounds,
    Page,
    Stats,
    StoreBusy,
    StoreFull,
    device_charge,
    encode_row,
    new_epoch,
    new_pair_code,
    next_seq,
    workspace_charge,
)

if TYPE_CHECKING:
    from relay.store.journal import Journal

_COMPACT_MIN = 1024
# Row chunks (module docstring): the live rows are sealed into a chunk when they
# would pass 1/32 of the workspace's retained row bytes, at most CHUNK_MAX, and
# only once that 1/32 is CHUNK_MIN or more.
CHUNK_MIN = 32 << 10
CHUNK_MAX = 256 << 10
# Work units (workspaces visited, entries expired, rows pruned) per sweep step; the
# app yields to the event loop between steps, so a sweep never stalls it.
SWEEP_STEP = 2000
# The page cache's bounds (module docstring): cached answers relay-wide, answers per
# workspace, and the largest answer kept (a quarter of the cache).
PAGE_CACHE_BYTES = 32 << 20
PAGE_CACHE_ENTRIES = 8
# What an entry costs beside its body: the header list, the tuple and dict slot.
PAGE_ENTRY_OVERHEAD = 1024
# After a search for empty workspaces to free found none, the next waits this long.
_EMPTY_SEARCH_PAUSE = 1.0


def now_us() -> int:
    return time.time_ns() // 1000


class _Workspace:
    __slots__ = (
        "bases",
        "candidates",
        "chunks",
        "cum",
        "cum0",
        "cut",
        "dedup",
        "dropped",
        "durable",
        "head",
        "keyring",
        "keyring_bytes",
        "keys",
        "live",
        "live_at",
        "live_bytes",
        "name",
        "page_bytes",
        "pages",
        "presence",
        "seal_at",
        "seqs",
        "stale",
        "start",
        "touched",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.seqs: array[int] = array("q")
        self.cum: array[int] = array("q")
        self.cum0 = 0  # cum before index 0: the row bytes of the rows cut off
        self.cut = 0  # how many rows were cut off the front of seqs, cum and keys
        # The row stream (module docstring): sealed chunk k starts at stream offset
        # bases[k]; then the live rows, the first of them row live_at (counting
        # the rows cut off), taking live_bytes of the stream.
        self.chunks: list[bytes] = []
        self.bases: list[int] = []
        self.live: list[bytes] = []
        self.live_at = 0
        self.live_bytes = 0
        self.seal_at = 0  # live rows up to this many bytes take no seal check (put_row)
        self.keys: list[bytes | None] = []
        self.dedup: dict[bytes, int] = {}
        self.start = 0
        self.head = 0
        self.durable = 0  # the highest seq a reader may see (relay.store.journal)
        self.dropped = 0
        self.stale = 0
        self.keyring: list[bytes] = []
        self.keyring_bytes = 0
        self.presence: dict[str, tuple[bytes, float]] = {}
        self.candidates: dict[str, tuple[bytes, float]] = {}
        self.touched = time.monotonic()
        # Cached answers (see the module docstring): query key → what the API built.
        self.pages: dict[Any, Any] | None = None
        self.page_bytes = 0

    @property
    def count(self) -> int:
        return len(self.seqs) - self.start

    @property
    def oldest(self) -> int:
        return self.seqs[self.start] if self.start < len(self.seqs) else 0

    def is_empty(self) -> bool:
        return self.count == 0 and not self.keyring and not self.presence and not self.candidates

    def has_side(self) -> bool:
        return bool(self.keyring or self.presence or self.candidates)

    # A row k occupies the stream from start_of(k) to end_of(k), followed by a comma:
    # every row before it takes its bytes and one comma.
    def start_of(self, k: int) -> int:
        return (self.cum[k - 1] if k else self.cum0) + k + self.cut

    def end_of(self, k: int) -> int:
        return self.cum[k] + k + self.cut

    def put_row(self, row: bytes) -> None:
        """Add `row` at the end of the stream (call before seqs and cum grow).

        Live rows past 1/32 of the retained row bytes (at most CHUNK_MAX;
        never below CHUNK_MIN: a workspace under 32 × CHUNK_MIN keeps its rows
        live) are sealed into a chunk first, at most one chunk per call:
        after a replay left thousands of rows live, appends seal them a chunk at
        a time rather than all at once.
        """
        live = self.live
        need = self.live_bytes + len(row) + 1
        if live and need <= self.seal_at:  # the common case (also inlined in append_row)
            live.append(row)
            self.live_bytes = need
            return
        if not live:
            self.live_at = len(self.seqs) + self.cut
        cum = self.cum
        retained = (cum[-1] if cum else self.cum0) - (
            cum[self.start - 1] if self.start else self.cum0
        )
        limit = min(CHUNK_MAX, retained >> 5)
        self.seal_at = max(CHUNK_MIN, limit)
        if live and need > limit >= CHUNK_MIN:
            self._seal(limit)
            live = self.live
            need = self.live_bytes + len(row) + 1
            if not live:
                self.live_at = len(self.seqs) + self.cut
        live.append(row)
        self.live_bytes = need

    def extend_rows(self, seqs: list[int], rows: list[bytes]) -> int:
        """Append rows with their seqs to seqs, cum and the live rows, in bulk (replay,
        snapshot load); returns their row bytes. Nothing is copied: later appends
        seal the live rows into chunks (put_row)."""
        w_seqs, cum = self.seqs, self.cum
        before = cum[-1] if cum else self.cum0
        if not self.live:
            self.live_at = len(w_seqs) + self.cut
        w_seqs.extend(seqs)
        running = itertools.accumulate(map(len, rows), initial=before)
        next(running)  # the initial value: the last row's, already there
        cum.extend(running)
        size = cum[-1] - before
        self.live.extend(rows)
        self.live_bytes += size + len(rows)
        return size

    def _seal(self, limit: int) -> None:
        """The oldest live rows, at most `limit` bytes of stream (one row at least),
        become one immutable chunk, each row followed by its comma."""
        live, cum, cut = self.live, self.cum, self.cut
        first = self.live_at - cut  # the row index of live[0]
        start = self.start_of(first)

        def after(q: int) -> int:  # the stream offset just past live[q - 1]'s comma
            return cum[first + q - 1] + first + q + cut

        q = max(1, bisect.bisect_right(range(1, len(live) + 1), start + limit, key=after))
        self.bases.append(start)
        self.chunks.append(b",".join([*live[:q], b""]))
        self.live_bytes -= after(q) - start
        self.live = live[q:]
        self.live_at += q

    def seal_before(self, j: int) -> None:
        """Seal the live rows before row j into chunks: a read about to send more than
        CHUNK_MAX bytes of live rows (rows a replay or snapshot load left live)
        copies them once into chunks instead of joining them for itself alone."""
        live, cum, cut = self.live, self.cum, self.cut
        first = self.live_at - cut
        retained = cum[-1] - (cum[self.start - 1] if self.start else self.cum0)
        limit = min(CHUNK_MAX, retained >> 5)
        if limit < CHUNK_MIN:
            return

        def after(q: int) -> int:  # the stream offset just past live[q - 1]'s comma
            return cum[first + q - 1] + first + q + cut

        p, n = 0, j - first
        start = self.start_of(first)
        while p < n:
            q = p + max(1, bisect.bisect_right(range(p + 1, n + 1), start + limit, key=after))
            self.bases.append(start)
            self.chunks.append(b",".join([*live[p:q], b""]))
            end = after(q)
            self.live_bytes -= end - start
            start = end
            p = q
        self.live = live[p:]
        self.live_at += p

    def row(self, k: int) -> bytes:
        """Row k's bytes (a slice of its chunk, or the live row itself)."""
        first = self.live_at - self.cut
        if k >= first and self.live:
            return self.live[k - first]
        start = self.start_of(k)
        c = bisect.bisect_right(self.bases, start) - 1
        base = self.bases[c]
        return self.chunks[c][start - base : self.end_of(k) - base]

    @property
    def rows(self) -> list[bytes | None]:
        """Every slot's row, None for those dropped (for tests and debugging)."""
        return [None] * self.start + [self.row(k) for k in range(self.start, len(self.seqs))]

    def pieces(self, i: int, j: int) -> list[bytes | memoryview]:
        """Rows i to j-1 as a JSON array: "[", slices of the stream, "]".

        Sealed chunks are immutable and lent as memoryviews (or whole); the live
        rows in the page are joined (at most about CHUNK_MAX bytes). A page
        inside one chunk, or among the live rows, comes back as one bytes.
        """
        live = self.live
        first = self.live_at - self.cut if live else j
        if i >= first:  # only live rows: one join, as rows always were
            x, y = i - first, j - first
            if y - x == 1:
                return [b"[" + live[x] + b"]"]
            return [b",".join([b"[" + live[x], *live[x + 1 : y - 1], live[y - 1] + b"]"])]
        a = self.start_of(i)
        # The end of the page's sealed part: its last row, or with the comma after
        # it when live rows follow.
        b = self.end_of(j - 1) if j <= first else self.start_of(first)
        bases, chunks = self.bases, self.chunks
        c = bisect.bisect_right(bases, a) - 1
        base = bases[c]
        chunk = chunks[c]
        if j <= first and b <= base + len(chunk):
            return [b"".join((b"[", memoryview(chunk)[a - base : b - base], b"]"))]
        out: list[bytes | memoryview] = [b"["]
        while a < b:
            chunk = chunks[c]
            base = bases[c]
            x = a - base
            y = min(b - base, len(chunk))
            if x == 0 and y == len(chunk):
                out.append(chunk)
            else:
                out.append(memoryview(chunk)[x:y])
            a = base + y
            c += 1
        if j > first:
            out.append(b",".join([*live[: j - first - 1], live[j - first - 1] + b"]"]))
        else:
            out.append(b"]")
        return out

    def bounds(self, i: int, j: int) -> array[int]:
        """cum before row i, then each row's cum up to j-1 (Page's `bounds`)."""
        if i:
            return self.cum[i - 1 : j]
        out = array("q", (self.cum0,))
        out.extend(self.cum[0:j])
        return out

    def append_row(self, seq: int, row: bytes, key: bytes) -> None:
        live = self.live
        need = self.live_bytes + len(row) + 1
        if live and need <= self.seal_at:  # put_row's common case, without the call
            live.append(row)
            self.live_bytes = need
        else:
            self.put_row(row)
        self.seqs.append(seq)
        prev = self.cum[-1] if self.cum else self.cum0
        self.cum.append(prev + len(row))
        self.keys.append(key)
        self.dedup[key] = seq
        self.head = seq

    def drop_oldest(self, n: int = 1) -> tuple[int, int]:
        """Forget the n oldest retained rows; returns their row and key bytes."""
        i = self.start
        j = i + n
        keys, seqs, dedup, cum = self.keys, self.seqs, self.dedup, self.cum
        assert i < j <= len(seqs)
        size = cum[j - 1] - (cum[i - 1] if i else self.cum0)
        key_bytes = 0
        for k in range(i, j):
            key = keys[k]
            key_bytes += len(key)  # type: ignore[arg-type]
            if dedup.get(key) == seqs[k]:  # type: ignore[arg-type]
                del dedup[key]  # type: ignore[arg-type]
            keys[k] = None
        self.dropped = seqs[j - 1]
        self.start = j
        chunks = self.chunks
        # _free_chunks's common case, without the call: row j is in the first chunk.
        if not chunks or cum[j - 1] + j + self.cut >= self.bases[0] + len(chunks[0]):
            self._free_chunks(j)
        if j >= _COMPACT_MIN and j * 2 >= len(seqs):
            self.cum0 = cum[j - 1]
            self.cut += j
            del seqs[:j]
            del cum[:j]
            del keys[:j]
            self.start = 0
        return size, key_bytes

    def _free_chunks(self, j: int) -> None:
        """Forget the rows before j from the stream: chunks they fill wholly go,
        and so do live rows before j."""
        chunks, bases = self.chunks, self.bases
        first = self.live_at - self.cut
        if j >= first:  # every sealed row is dead; so are the live ones before j
            chunks.clear()
            bases.clear()
            if j > first and self.live:
                n = min(j - first, len(self.live))
                self.live_bytes -= self.start_of(first + n) - self.start_of(first)
                del self.live[:n]
                self.live_at += n
            return
        pos = self.cum[j - 1] + j + self.cut  # start_of(j); j >= 1 here
        if pos >= bases[0] + len(chunks[0]):  # the first chunk (and perhaps more) is all dead
            c = bisect.bisect_right(bases, pos) - 1
            del chunks[:c]
            del bases[:c]


class _Rows(Sequence[bytes]):
    """A workspace's retained rows as they are now, read later (snapshots).

    Taken on the event loop for the cost of copying the row offsets and the list
    of chunks and live rows (references); chunks and rows are immutable, so a
    worker thread can slice rows out of them while the store keeps changing.
    """

    def __init__(self, w: _Workspace) -> None:
        self._chunks = list(w.chunks)
        self._bases = list(w.bases)
        self._live = list(w.live)
        self._bounds = w.bounds(w.start, len(w.seqs)) if w.count else array("q")
        self._first = w.start_of(w.start) if w.count else 0
        # Where the live rows begin, counted from the first retained row.
        self._live_from = len(self) - len(self._live)

    def __len__(self) -> int:
        return max(0, len(self._bounds) - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    @overload
    def __getitem__(self, k: int) -> bytes: ...
    @overload
    def __getitem__(self, k: slice) -> list[bytes]: ...
    def __getitem__(self, k: int | slice) -> bytes | list[bytes]:
        if isinstance(k, slice):
            return [self._row(i) for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self._row(k % len(self))

    def _row(self, i: int) -> bytes:
        if i >= self._live_from:
            return self._live[i - self._live_from]
        b = self._bounds
        # Each row before i takes its bytes and a comma.
        start = self._first + (b[i] - b[0]) + i
        c = bisect.bisect_right(self._bases, start) - 1
        base = self._bases[c]
        return self._chunks[c][start - base : start - base + b[i + 1] - b[i]]


@dataclass(slots=True)
class WorkspaceState:
    """A consistent copy of one workspace, for snapshots."""

    name: str
    head: int
    dropped: int
    seqs: list[int]
    rows: Sequence[bytes]
    keys: list[bytes]
    keyring: list[bytes]
    presence: list[tuple[str, bytes, float]]
    candidates: list[tuple[str, bytes, float]]


class MemoryStore:
    def __init__(
        self,
        bounds: Bounds | None = None,
        epoch: str | None = None,
        page_cache_bytes: int | None = None,
    ) -> None:
        self.bounds = bounds or Bounds()
        # 0: no page cache. By default PAGE_CACHE_BYTES, or an eighth of a smaller budget.
        self.page_cache_bytes = (
            min(PAGE_CACHE_BYTES, self.bounds.max_bytes // 8)
            if page_cache_bytes is None
            else page_cache_bytes
        )
        self._page_bytes = 0
        # Workspaces holding cached pages, in the order they began to: the first
        # gives its pages up when the cache is full.
        self._paged: dict[_Workspace, None] = {}
        self._epoch = epoch or new_epoch()
        self._ws: dict[str, _Workspace] = {}
        self._order: deque[_Workspace] = deque()
        self._stale_total = 0
        self._stored_bytes = 0  # row bytes of retained envelopes (the stats figure)
        # What HIVE_RELAY_MAX_BYTES bounds, as charged (relay.store.base): retained
        # envelopes and workspaces in `_pool`, side-channel entries in `_side_bytes`
        # (at most a quarter of the budget, on top).
        self._pool = 0
        self._ws_bytes = 0  # the workspaces' share of `_pool`
        self._bare_bytes = 0  # the charges of workspaces without side-channel data
        self._side_bytes = 0
        self._envelopes = 0
        self._pairs: dict[str, tuple[str, float]] = {}
        # (expiry, code) of every code, soonest first: expiring is O(log n) per code
        # that goes, never a scan of the codes that stay.
        self._pair_expiry: list[tuple[float, str]] = []
        self._listener: AppendListener | None = None
        self._listened: Callable[[str], bool] = lambda ws: False
        self._empty_search_after = 0.0
        # Bumped on every change, so the snapshot writer knows whether to write.
        self.version = 0
        # The journal, when the store is durable; rows waiting for it, in its order.
        self._journal: Journal | None = None
        self._pending: deque[tuple[int, _Workspace, list[tuple[int, bytes]]]] = deque()
        # Workspaces that dropped rows since the last record: an append's own drops
        # ride in its record (its workspace's new drop horizon); others get a "d".
        self._drops: dict[_Workspace, None] = {}

    # ----------------------------------------------------------------- basics
    @property
    def epoch(self) -> str:
        return self._epoch

    def adopt_epoch(self, epoch: str) -> None:
        self._epoch = epoch
        self._drop_all_pages()  # every answer names the epoch

    # ------------------------------------------------------------ page cache
    def cached_page(self, ws: str, key: Any) -> Any:
        """The answer cached for `key` in workspace `ws`, or None."""
        w = self._ws.get(ws)
        if w is None:
            return None
        pages = w.pages
        entry = None if pages is None else pages.get(key)
        return None if entry is None else entry[0]

    def cache_page(self, ws: str, key: Any, page: Any, size: int) -> None:
        """Keep `page` (about `size` bytes) as the answer for `key` until `ws` changes.

        Call it right after the read the page was built from, with no await in
        between, so the page shows the workspace as it is now.
        """
        w = self._ws.get(ws)
        cap = self.page_cache_bytes
        size += PAGE_ENTRY_OVERHEAD
        if w is None or size > cap // 4:
            return
        pages = w.pages
        if pages is None:
            pages = w.pages = {}
            self._paged[w] = None
        elif key in pages:
            return
        elif len(pages) >= PAGE_CACHE_ENTRIES:
            # Cache-busting query strings must not grow it: the oldest entry goes.
            _, gone = pages.pop(next(iter(pages)))
            w.page_bytes -= gone
            self._page_bytes -= gone
        while self._page_bytes + size > cap and self._paged:
            oldest = next(iter(self._paged))
            if oldest is w:
                break
            self._drop_pages(oldest)
        if self._page_bytes + size > cap:
            return
        pages[key] = (page, size)
        w.page_bytes += size
        self._page_bytes += size

    def _drop_pages(self, w: _Workspace) -> None:
        """Forget every cached answer of `w`: call on any change a page could show."""
        if w.pages is None:
            return
        w.pages = None
        self._page_bytes -= w.page_bytes
        w.page_bytes = 0
        del self._paged[w]

    def _drop_all_pages(self) -> None:
        for w in list(self._paged):
            self._drop_pages(w)

    @property
    def page_cache_used(self) -> int:
        """Bytes held by cached answers (at most page_cache_bytes)."""
        return self._page_bytes

    def set_listener(self, listener: AppendListener | None) -> None:
        self._listener = listener

    def set_listened(self, listened: Callable[[str], bool]) -> None:
        """Tells the store which workspaces have live listeners (never freed early)."""
        self._listened = listened

    async def start(self) -> None:
        if self._journal is not None:
            self._journal.start()

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return self._journal is None or self._journal.failed is None

    # ------------------------------------------------------------ durability
    @property
    def journal(self) -> Journal | None:
        return self._journal

    def attach_journal(self, journal: Journal) -> None:
        """From now on every change is journaled, and readers see only durable rows."""
        self._journal = journal
        journal.on_durable = self._release
        for w in self._ws.values():
            w.durable = w.head

    def _release(self, lsn: int) -> None:
        """The journal made everything up to `lsn` safe: readers and listeners may see it."""
        pending = self._pending
        listener = self._listener
        while pending and pending[0][0] <= lsn:
            _, w, rows = pending.popleft()
            w.durable = rows[-1][0]
            if w.pages is not None:
                self._drop_pages(w)  # the durable mark moved: readers may see more
            if listener is not None:
                listener(w.name, rows)

    def _journal_drops(self, own: _Workspace | None = None) -> None:
        """Journal the drop horizons that moved, except `own`'s (its record has it)."""
        j = self._journal
        if j is None or not self._drops:
            return
        for w in self._drops:
            if w is not own:
                j.add(("d", w.name, w.dropped))
        self._drops.clear()

    async def _durable(self, lsn: int) -> None:
        """Until record `lsn` is safe (StoreUnavailable if the disk failed)."""
        assert self._journal is not None
        fut = self._journal.wait(lsn)
        if fut is not None:
            await fut  # the caller's own: cancelling it cancels no other caller

    async def _seen(self, w: _Workspace, seq: int) -> None:
        """A duplicate's answer waits until the row it names is durable too."""
        j = self._journal
        if j is not None and seq > w.durable:
            await self._durable(j.lsn)

    async def stats(self) -> Stats:
        return self.stats_now()

    def stats_now(self) -> Stats:
        return Stats(
            workspaces=len(self._ws),
            envelopes=self._envelopes,
            stored_bytes=self._stored_bytes,
            pairings=len(self._pairs),
        )

    def charged_now(self) -> tuple[int, int]:
        """(envelopes and workspaces, side-channel entries) as charged to the budget."""
        return self._pool, self._side_bytes

    def _get(self, ws: str, loading: bool = False) -> _Workspace:
        w = self._ws.get(ws)
        if w is None:
            charge = workspace_charge(ws)
            if not loading:
                self._make_room(charge)
            w = self._ws[ws] = _Workspace(ws)
            self._pool += charge
            self._ws_bytes += charge
            self._bare_bytes += charge
        w.touched = time.monotonic()
        return w

    def _make_room(self, need: int) -> None:
        """Room in the budget for a new workspace, or StoreFull (413 relay_full).

        Empty workspaces without listeners go first (they hold only their head
        and drop horizon), then the oldest envelopes relay-wide, as for any
        append past the budget, with each workspace they leave empty.
        """
        limit = self.bounds.max_bytes
        if self._pool + need <= limit:
            return
        self._free_empty(self._pool + need - limit)
        # Evicting every envelope and freeing every workspace that leaves empty is the
        # most that could be freed: when even that is short, refuse before evicting.
        envelopes = self._pool - self._ws_bytes
        if self._pool - envelopes - self._bare_bytes + need > limit:
            raise StoreFull(
                "relay_full",
                "the relay holds as many workspaces as its memory budget allows",
            )
        while self._pool + need > limit and self._order:
            w = self._order[0]
            self._evict_global()
            if w.is_empty() and self._ws.get(w.name) is w and not self._listened(w.name):
                self._forget(w.name)
        if self._pool + need > limit:
            raise StoreFull(
                "relay_full",
                "the relay holds as many workspaces as its memory budget allows",
            )

    def _free_empty(self, need: int) -> None:
        """Free empty, unlistened workspaces, first made first, for at least `need` bytes.

        One pass frees a sixteenth of the budget or more when it can, so the
        search (a walk over the workspaces) is paid rarely; a pass that finds
        nothing pauses the search for a second.
        """
        now = time.monotonic()
        if now < self._empty_search_after:
            return
        goal = max(need, self.bounds.max_bytes // 16)
        victims: list[str] = []
        freed = 0
        for name, w in self._ws.items():
            if w.is_empty() and not self._listened(name):
                victims.append(name)
                freed += workspace_charge(name)
                if freed >= goal:
                    break
        for name in victims:
            self._forget(name)
        if freed < need:
            self._empty_search_after = now + _EMPTY_SEARCH_PAUSE

    def _forget(self, name: str) -> None:
        # Only empty workspaces are forgotten; every row it had is already counted
        # stale in _order.
        w = self._ws.pop(name)
        self._drop_pages(w)
        charge = workspace_charge(name)
        self._pool -= charge
        self._ws_bytes -= charge
        self._bare_bytes -= charge
        self.version += 1
        if self._journal is not None:
            self._journal_drops()
            self._journal.add(("f", name))

    def _side_added(self, w: _Workspace) -> None:
        """Call before a workspace gains side-channel data."""
        if not w.has_side():
            self._bare_bytes -= workspace_charge(w.name)

    def _side_removed(self, w: _Workspace) -> None:
        """Call after a workspace lost side-channel data."""
        if not w.has_side():
            self._bare_bytes += workspace_charge(w.name)

    # -------------------------------------------------------------- envelopes
    async def append(self, ws: str, body: bytes, key: bytes) -> tuple[int, bool]:
        j = self._journal
        if j is not None:
            j.check()
        w = self._get(ws)
        seen = w.dedup.get(key)
        if seen is not None:
            await self._seen(w, seen)
            return seen, True
        seq = next_seq(w.head, now_us())
        row = encode_row(seq, body)
        w.append_row(seq, row, key)
        self._order.append(w)
        self._stored_bytes += len(row)
        self._pool += len(row) + len(key) + ENVELOPE_OVERHEAD
        self._envelopes += 1
        if j is None:
            self._after_append(w, 1)
            if self._listener is not None:
                self._listener(ws, [(seq, row)])
            return seq, False
        self._after_append(w, 1)
        self._journal_drops(w)
        lsn = j.add(("a", ws, seq, key, row, w.dropped))
        self._pending.append((lsn, w, [(seq, row)]))
        await self._durable(lsn)
        return seq, False

    async def append_batch(
        self, ws: str, bodies: list[bytes], keys: list[bytes]
    ) -> list[tuple[int, bool]]:
        # The single-append steps, inlined: a batch is the bulk path, and attribute
        # lookups per element add up.
        j = self._journal
        if j is not None:
            j.check()
        w = self._get(ws)
        dedup = w.dedup
        seqs, cum, row_keys = w.seqs, w.cum, w.keys
        put_row = w.put_row
        total = cum[-1] if cum else w.cum0
        before = total
        head = w.head
        now = now_us()
        out: list[tuple[int, bool]] = []
        fresh: list[tuple[int, bytes]] = []
        key_bytes = 0
        seen_max = 0
        fresh_keys: list[bytes] = []
        for body, key in zip(bodies, keys, strict=True):
            seen = dedup.get(key)
            if seen is not None:
                out.append((seen, True))
                seen_max = max(seen_max, seen)
                continue
            head = next_seq(head, now)
            row = encode_row(head, body)
            total += len(row)
            key_bytes += len(key)
            put_row(row)  # before cum grows: an empty stream starts where cum ends
            seqs.append(head)
            cum.append(total)
            row_keys.append(key)
            dedup[key] = head
            out.append((head, False))
            fresh.append((head, row))
            fresh_keys.append(key)
        if fresh:
            w.head = head
            self._order.extend(itertools.repeat(w, len(fresh)))
            self._stored_bytes += total - before
            self._pool += total - before + key_bytes + len(fresh) * ENVELOPE_OVERHEAD
            self._envelopes += len(fresh)
            if j is None:
                self._after_append(w, len(fresh))
                if self._listener is not None:
                    self._listener(ws, fresh)
                return out
            self._after_append(w, len(fresh))
            self._journal_drops(w)
            lsn = j.add(
                ("b", ws, [s for s, _ in fresh], fresh_keys, [r for _, r in fresh], w.dropped)
            )
            self._pending.append((lsn, w, fresh))
            await self._durable(lsn)
        elif seen_max:
            await self._seen(w, seen_max)
        return out

    def _after_append(self, w: _Workspace, added: int) -> None:
        # Every append, batch and replayed append comes here (drops it causes too).
        if w.pages is not None:
            self._drop_pages(w)
        self.version += 1
        b = self.bounds
        if b.max_envelopes and w.count > b.max_envelopes:
            self._drop_local(w, w.count - b.max_envelopes)
        if b.retention_secs:
            self._prune_age(w, now_us() - int(b.retention_secs * 1_000_000))
        while self._pool > b.max_bytes and len(self._order) > 1:
            self._evict_global()
        if self._stale_total > _COMPACT_MIN and self._stale_total * 2 > len(self._order):
            self._compact_order()

    def _drop_local(self, w: _Workspace, n: int = 1) -> None:
        if w.pages is not None:
            self._drop_pages(w)
        rows, keys = w.drop_oldest(n)
        if self._journal is not None:
            self._drops[w] = None
        self._stored_bytes -= rows
        self._pool -= rows + keys + n * ENVELOPE_OVERHEAD
        self._envelopes -= n
        w.stale += n
        self._stale_total += n

    def _prune_age(self, w: _Workspace, cutoff_us: int) -> None:
        # A seq is at least its append time in microseconds, so seq < cutoff means old.
        while w.count and w.seqs[w.start] < cutoff_us:
            self._drop_local(w)

    def _evict_global(self) -> None:
        w = self._order.popleft()
        if w.stale:
            w.stale -= 1
            self._stale_total -= 1
            return
        if w.pages is not None:
            self._drop_pages(w)
        rows, keys = w.drop_oldest()
        if self._journal is not None:
            self._drops[w] = None
        self._stored_bytes -= rows
        self._pool -= rows + keys + ENVELOPE_OVERHEAD
        self._envelopes -= 1

    def _compact_order(self) -> None:
        kept: deque[_Workspace] = deque()
        for w in self._order:
            if w.stale:
                w.stale -= 1
            else:
                kept.append(w)
        self._order = kept
        self._stale_total = 0

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        return self.read_now(ws, after, limit, max_bytes)

    def read_now(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        w = self._ws.get(ws)
        if w is None:
            return Page([], 0, 0, 0, False)
        end = len(w.seqs)
        head = w.head
        oldest = w.oldest
        if w.durable < head and self._journal is not None:
            # The durability gate: rows past `durable` are not safe yet.
            head = w.durable
            end = bisect.bisect_right(w.seqs, head, w.start, end)
            oldest = w.seqs[w.start] if w.start < end else 0
        i = bisect.bisect_right(w.seqs, after, w.start, end)
        if i >= end:
            return Page([], head, oldest, w.dropped, False)
        cum = w.cum
        base = cum[i - 1] if i else w.cum0
        j = bisect.bisect_right(cum, base + max_bytes, i, min(end, i + limit))
        j = max(j, i + 1)
        if w.live_bytes > CHUNK_MAX:
            first = w.live_at - w.cut
            if j > first and w.end_of(j - 1) - w.start_of(max(i, first)) > CHUNK_MAX:
                w.seal_before(j)
        return Page(None, head, oldest, w.dropped, j < end, w.pieces(i, j), w.bounds(i, j))

    # ---------------------------------------------------------- side channels
    def _check_side(self, size: int, charge: int, replaces: int = 0) -> None:
        """Per-entry and relay-wide bounds for side-channel data.

        `size` is the entry's data, held to HIVE_RELAY_MAX_SIDE_BYTES; `charge`
        what it costs the budget (relay.store.base), `replaces` the charge of
        the entry it replaces. Side channels get a quarter of the global byte
        budget. They are never evicted (that would lose acknowledged writes), so
        past it writes are refused with 413 until entries are replaced or expire.
        """
        if size > self.bounds.max_side_bytes:
            raise StoreFull(
                "too_large",
                f"the entry is {size} bytes; the limit is {self.bounds.max_side_bytes}",
            )
        if self._side_bytes - replaces + charge > self.bounds.max_bytes // 4:
            raise StoreFull(
                "relay_full",
                "the relay's storage for keyrings, presence and candidates is full",
            )

    async def keyring_append(self, ws: str, blob: bytes) -> None:
        j = self._journal
        if j is not None:
            j.check()
        charge = len(blob) + BLOB_OVERHEAD
        self._check_side(len(blob), charge)
        w = self._ws.get(ws)
        if w is not None and len(w.keyring) >= self.bounds.max_keyring:
            raise StoreFull(
                "keyring_full",
                f"the workspace keyring holds its limit of {self.bounds.max_keyring} blobs",
            )
        w = self._get(ws)
        self._put_blob(w, blob)
        if j is not None:
            self._journal_drops()
            await self._durable(j.add(("k", ws, blob)))

    def _put_blob(self, w: _Workspace, blob: bytes) -> None:
        self._side_added(w)
        w.keyring.append(blob)
        w.keyring_bytes += len(blob)
        self._side_bytes += len(blob) + BLOB_OVERHEAD
        self.version += 1

    async def keyring_list(self, ws: str) -> list[bytes]:
        w = self._ws.get(ws)
        return list(w.keyring) if w is not None else []

    def _channel(self, w: _Workspace, channel: str) -> dict[str, tuple[bytes, float]]:
        if channel == "presence":
            return w.presence
        if channel == "candidates":
            return w.candidates
        raise ValueError(f"unknown channel {channel!r}; expected one of {DEVICE_CHANNELS}")

    async def device_put(self, channel: str, ws: str, device_id: str, data: bytes) -> None:
        if channel not in DEVICE_CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {DEVICE_CHANNELS}")
        j = self._journal
        if j is not None:
            j.check()
        now = time.time()
        w = self._ws.get(ws)
        old: tuple[bytes, float] | None = None
        count = 0
        if w is not None:
            entries = self._channel(w, channel)
            self._expire_devices(w, entries, now)
            old = entries.get(device_id)
            count = len(entries)
        charge = device_charge(device_id, data)
        replaces = device_charge(device_id, old[0]) if old is not None else 0
        self._check_side(len(data), charge, replaces)
        if old is None and count >= self.bounds.max_devices:
            raise StoreFull(
                "too_many_devices",
                f"the workspace {channel} holds its limit of {self.bounds.max_devices} devices",
            )
        w = self._get(ws)
        self._put_device(w, channel, device_id, data, now)
        if j is not None:
            self._journal_drops()
            await self._durable(j.add(("v", channel, ws, device_id, data, now)))

    def _put_device(self, w: _Workspace, channel: str, device: str, data: bytes, at: float) -> None:
        entries = self._channel(w, channel)
        old = entries.get(device)
        self._side_added(w)
        entries[device] = (data, at)
        replaces = device_charge(device, old[0]) if old is not None else 0
        self._side_bytes += device_charge(device, data) - replaces
        self.version += 1

    async def device_map(self, channel: str, ws: str) -> list[tuple[str, bytes]]:
        w = self._ws.get(ws)
        if w is None:
            return []
        entries = self._channel(w, channel)
        self._expire_devices(w, entries, time.time())
        return [(device, data) for device, (data, _) in entries.items()]

    def _expire_devices(
        self, w: _Workspace, entries: dict[str, tuple[bytes, float]], now: float
    ) -> int:
        """Drop entries past the presence TTL; returns about how many were looked at."""
        ttl = self.bounds.presence_ttl
        if not ttl or not entries:
            return 0
        expired = [d for d, (_, at) in entries.items() if now - at > ttl]
        for device in expired:
            self._side_bytes -= device_charge(device, entries.pop(device)[0])
            self.version += 1
        if expired:
            self._side_removed(w)
        return len(entries) + len(expired)

    # --------------------------------------------------------------- pairing
    async def pair_create(self, payload: str, ttl: int) -> str:
        j = self._journal
        if j is not None:
            j.check()
        now = time.time()
        self._expire_pairs(now)
        if len(self._pairs) >= self.bounds.max_pairings:
            raise StoreBusy(
                "too_many_pairings", "the relay holds too many pairing codes; try again later"
            )
        while True:
            code = new_pair_code()
            if code not in self._pairs:
                break
        self._pairs[code] = (payload, now + ttl)
        heapq.heappush(self._pair_expiry, (now + ttl, code))
        self.version += 1
        if j is not None:
            await self._durable(j.add(("p", code, payload, now + ttl)))
        return code

    async def pair_resolve(self, code: str) -> str | None:
        entry = self._pairs.get(code)
        if entry is None:
            return None
        if entry[1] <= time.time():
            del self._pairs[code]
            return None
        return entry[0]

    def _expire_pairs(self, now: float) -> None:
        heap = self._pair_expiry
        while heap and heap[0][0] <= now:
            exp, code = heapq.heappop(heap)
            entry = self._pairs.get(code)
            # A resolve may have dropped it already, and the code been drawn again since.
            if entry is not None and entry[1] == exp:
                del self._pairs[code]

    # ------------------------------------------------------------ house-keeping
    def sweep(self, listened: Callable[[str], bool] = lambda ws: False) -> int:
        """Expire what has a TTL, prune by age, free idle empty workspaces, all at once.

        Returns the number of workspaces freed. The app runs `sweep_steps` instead.
        """
        *_, freed = self.sweep_steps(listened)
        return freed

    def sweep_steps(self, listened: Callable[[str], bool] = lambda ws: False) -> Iterator[int]:
        """The sweep in steps of about SWEEP_STEP units of work each.

        Yields the number of workspaces freed so far after every step; the caller
        yields to the event loop in between, so 200,000 workspaces never stall it.
        The store may change between steps: each workspace is looked up afresh.
        """
        now = time.time()
        self._expire_pairs(now)
        yield 0
        cutoff = now_us() - int(self.bounds.retention_secs * 1_000_000)
        idle_before = time.monotonic() - self.bounds.idle_workspace_secs
        freed = 0
        work = 0
        for name in list(self._ws):
            w = self._ws.get(name)
            if w is None:
                continue
            before = w.count
            if self.bounds.retention_secs:
                self._prune_age(w, cutoff)
            work += 1 + before - w.count
            work += self._expire_devices(w, w.presence, now)
            work += self._expire_devices(w, w.candidates, now)
            if w.is_empty() and w.touched < idle_before and not listened(name):
                self._forget(name)
                freed += 1
            if work >= SWEEP_STEP:
                work = 0
                self._journal_drops()
                yield freed
        if self._stale_total > _COMPACT_MIN and self._stale_total * 2 > len(self._order):
            self._compact_order()
        self._journal_drops()
        yield freed

    # --------------------------------------------------------------- snapshots
    def export_state(self) -> tuple[list[WorkspaceState], list[tuple[str, str, float]]]:
        """A consistent copy of everything, cheap enough to take on the event loop.

        Lists are copied (references only); the bytes objects are immutable, so the
        copy can be serialized in a worker thread while the store keeps changing.
        """
        out = []
        for w in self._ws.values():
            out.append(
                WorkspaceState(
                    name=w.name,
                    head=w.head,
                    dropped=w.dropped,
                    seqs=w.seqs[w.start :].tolist(),
                    rows=_Rows(w),
                    keys=w.keys[w.start :],  # type: ignore[arg-type]
                    keyring=list(w.keyring),
                    presence=[(d, v, t) for d, (v, t) in w.presence.items()],
                    candidates=[(d, v, t) for d, (v, t) in w.candidates.items()],
                )
            )
        pairs = [(c, p, exp) for c, (p, exp) in self._pairs.items()]
        return out, pairs

    def import_state(
        self, workspaces: Iterator[WorkspaceState], pairs: list[tuple[str, str, float]]
    ) -> None:
        """Load a snapshot into an empty store (start-up only)."""
        now = time.time()
        loaded: list[_Workspace] = []
        for st in workspaces:
            w = self._get(st.name, loading=True)
            loaded.append(w)
            if st.seqs:
                rows = list(st.rows)
                size = w.extend_rows(st.seqs, rows)
                w.keys.extend(st.keys)
                w.dedup.update(zip(st.keys, st.seqs, strict=True))
                w.head = st.seqs[-1]
                self._stored_bytes += size
                self._pool += size + sum(map(len, st.keys)) + len(rows) * ENVELOPE_OVERHEAD
                self._envelopes += len(rows)
            w.head = max(w.head, st.head)
            w.dropped = st.dropped
            for blob in st.keyring:
                w.keyring.append(blob)
                w.keyring_bytes += len(blob)
                self._side_bytes += len(blob) + BLOB_OVERHEAD
            for device, data, at in st.presence:
                w.presence[device] = (data, at)
                self._side_bytes += device_charge(device, data)
            for device, data, at in st.candidates:
                w.candidates[device] = (data, at)
                self._side_bytes += device_charge(device, data)
            if w.has_side():
                self._bare_bytes -= workspace_charge(w.name)
        for code, payload, exp in pairs:
            if exp > now:
                self._pairs[code] = (payload, exp)
                self._pair_expiry.append((exp, code))
        heapq.heapify(self._pair_expiry)
        # Seqs are append times (microseconds), so merging by seq approximates the
        # relay-wide append order the byte budget evicts by.
        merged = heapq.merge(*([(seq, i) for seq in w.seqs] for i, w in enumerate(loaded)))
        self._order = deque(loaded[i] for _, i in merged)
        # Bounds may have been lowered since the snapshot was written.
        for w in loaded:
            if w.count:
                self._after_append(w, 0)

    # ------------------------------------------------------------------ replay
    def replay(self, records: Iterator[list[Any]]) -> int:
        """Apply journal records (relay.store.journal) at start-up; returns how many.

        Kinds: "a" (ws, seq, key, row, dropped) one append; "b" (ws, seqs, keys,
        rows, dropped) a batch's new rows, each with its workspace's drop horizon
        after it; "d" (ws, seq) another workspace's rows up to seq dropped; "f" (ws) an empty
        workspace freed; "k" (ws, blob) a keyring blob; "v" (channel, ws, device,
        data, at) a presence or candidate entry; "p" (code, payload, expiry) a
        pairing code; "h" (a segment's header) and "c" (a clean stop) are read by
        the snapshotter.

        Every drop the live relay made is in the journal (an append's own
        workspace's horizon rides in its record, other workspaces' in "d"
        records before it), so replay applies the recorded horizons rather than
        re-running the bounds per record. Appends are gathered per workspace and
        applied in bulk (array and list extends) when something needs the
        workspace as it is: a "d" for it, any other kind of record, or the end.
        A horizon only grows and drops take the oldest rows, so a gathered
        horizon applied after the rows gives the state the relay had. The bounds
        then run once per touched workspace (a no-op unless they were lowered
        since the journal was written), as after a snapshot load.
        """
        n = 0
        ws_map = self._ws
        get = self._get
        order_append = self._order.append
        # Per workspace with appends not applied yet: [seqs, keys, rows, horizon].
        gathered: dict[_Workspace, list[Any]] = {}
        touched: dict[_Workspace, None] = {}
        flush = self._replay_flush
        last_name: str | None = None  # the workspace of the last "a", and its:
        lw: Any = None
        last: list[Any] = []  # gathered[lw]
        for rec in records:
            n += 1
            kind = rec[0]
            if kind == "a":
                name = rec[1]
                if name != last_name:
                    lw = ws_map.get(name)
                    if lw is None:
                        lw = get(name, loading=True)
                    found_pending = gathered.get(lw)
                    if found_pending is None:
                        found_pending = gathered[lw] = [[], [], [], lw.dropped, lw.head]
                    last = found_pending
                    last_name = name
                seq = rec[2]
                if seq <= last[4]:  # in the snapshot already
                    continue
                last[4] = seq
                last[0].append(seq)
                last[1].append(rec[3])
                last[2].append(rec[4])
                if rec[5] > last[3]:  # noqa: PLR1730 (no call per record)
                    last[3] = rec[5]
                order_append(lw)
            elif kind == "b":
                w = get(rec[1], loading=True)
                pending = gathered.get(w)
                if pending is None:
                    pending = gathered[w] = [[], [], [], w.dropped, w.head]
                head = pending[4]
                added = 0
                for seq, key, row in zip(rec[2], rec[3], rec[4], strict=True):
                    if seq <= head:
                        continue
                    head = seq
                    pending[0].append(seq)
                    pending[1].append(key)
                    pending[2].append(row)
                    added += 1
                pending[4] = head
                if added:
                    self._order.extend(itertools.repeat(w, added))
                pending[3] = max(pending[3], rec[5])
            elif kind == "d":
                found = ws_map.get(rec[1])
                if found is not None:
                    pending = gathered.pop(found, None)
                    if pending is not None:
                        flush(found, pending)
                        touched[found] = None
                        if found.name == last_name:
                            last_name = None
                    self._replay_drop(found, rec[2])
            else:
                for w, pending in gathered.items():
                    flush(w, pending)
                    touched[w] = None
                gathered.clear()
                last_name = None
                if kind == "f":
                    found = ws_map.get(rec[1])
                    if found is not None and found.is_empty():
                        self._forget(rec[1])
                elif kind == "k":
                    self._put_blob(get(rec[1], loading=True), rec[2])
                elif kind == "v":
                    self._put_device(get(rec[2], loading=True), rec[1], rec[3], rec[4], rec[5])
                elif kind == "p":
                    code, payload, exp = rec[1], rec[2], rec[3]
                    self._pairs[code] = (payload, exp)
                    heapq.heappush(self._pair_expiry, (exp, code))
        for w, pending in gathered.items():
            flush(w, pending)
            touched[w] = None
        for w in touched:
            if ws_map.get(w.name) is w:  # not freed (and perhaps made anew) since
                self._after_append(w, 0)
        self.version += 1
        return n

    def _replay_flush(self, w: _Workspace, pending: list[Any]) -> None:
        """Apply one workspace's gathered appends, then its gathered drop horizon."""
        seqs, keys, rows, horizon, _ = pending
        if rows:
            size = w.extend_rows(seqs, rows)
            w.keys.extend(keys)
            w.dedup.update(zip(keys, seqs, strict=True))
            w.head = seqs[-1]
            self._stored_bytes += size
            self._pool += size + sum(map(len, keys)) + len(rows) * ENVELOPE_OVERHEAD
            self._envelopes += len(rows)
        if horizon > w.dropped:
            self._replay_drop(w, horizon)

    def _replay_drop(self, w: _Workspace, upto_seq: int) -> None:
        upto = bisect.bisect_right(w.seqs, upto_seq, w.start, len(w.seqs))
        if upto > w.start:
            self._drop_local(w, upto - w.start)
        if upto_seq > w.dropped:
            self._drop_pages(w)  # the drop horizon moved: the gap header may change
            w.dropped = upto_seq
