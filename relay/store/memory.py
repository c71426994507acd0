"""The in-memory store: the default, one process, no locks (one event loop).

Per workspace the log is four parallel sequences indexed from `start`:
`seqs` and `cum` (cumulative row bytes) are compact `array('q')`s so a cursor
read is two binary searches (O(log n + k)); `rows` holds each row encoded once
at append; `keys` holds each row's dedup key so pruning can forget it. Pruning
only advances `start` and clears the slot; the dead prefix is cut off once it is
half the log, so append stays amortized O(1) even at the retention cap.

Seq rule (docs/protocol.md): a seq is `max(now in Unix microseconds, head + 1)`. It
never rewinds, across restarts with or without a snapshot, as long as the clock
does not go back and a workspace does not sustain over a million appends a second.

The global byte budget evicts the oldest envelopes relay-wide: `_order` holds a
reference to the workspace of every appended row in append order. A workspace
that prunes rows itself (count or age) counts them in `stale`, and the eviction
walk skips that many of its entries; the deque is compacted when mostly stale.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import secrets
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from relay.store.base import (
    DEVICE_CHANNELS,
    AppendListener,
    Bounds,
    Page,
    Stats,
    StoreBusy,
    StoreFull,
    encode_row,
)

PAIR_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PAIR_CODE_LEN = 6
_COMPACT_MIN = 1024


def now_us() -> int:
    return time.time_ns() // 1000


def new_epoch() -> str:
    return secrets.token_hex(8)


class _Workspace:
    __slots__ = (
        "candidates",
        "cum",
        "dedup",
        "dropped",
        "head",
        "keyring",
        "keyring_bytes",
        "keys",
        "name",
        "presence",
        "rows",
        "seqs",
        "stale",
        "start",
        "touched",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.seqs: array[int] = array("q")
        self.cum: array[int] = array("q")
        self.rows: list[bytes | None] = []
        self.keys: list[bytes | None] = []
        self.dedup: dict[bytes, int] = {}
        self.start = 0
        self.head = 0
        self.dropped = 0
        self.stale = 0
        self.keyring: list[bytes] = []
        self.keyring_bytes = 0
        self.presence: dict[str, tuple[bytes, float]] = {}
        self.candidates: dict[str, tuple[bytes, float]] = {}
        self.touched = time.monotonic()

    @property
    def count(self) -> int:
        return len(self.rows) - self.start

    @property
    def oldest(self) -> int:
        return self.seqs[self.start] if self.start < len(self.seqs) else 0

    def is_empty(self) -> bool:
        return self.count == 0 and not self.keyring and not self.presence and not self.candidates

    def append_row(self, seq: int, row: bytes, key: bytes) -> None:
        self.seqs.append(seq)
        prev = self.cum[-1] if self.cum else 0
        self.cum.append(prev + len(row))
        self.rows.append(row)
        self.keys.append(key)
        self.dedup[key] = seq
        self.head = seq

    def drop_oldest(self, n: int = 1) -> int:
        """Forget the n oldest retained rows; returns their size in bytes."""
        i = self.start
        j = i + n
        rows, keys, seqs, dedup = self.rows, self.keys, self.seqs, self.dedup
        first = rows[i]
        assert first is not None and j <= len(rows)
        size = self.cum[j - 1] - (self.cum[i] - len(first))
        for k in range(i, j):
            key = keys[k]
            if dedup.get(key) == seqs[k]:  # type: ignore[arg-type]
                del dedup[key]  # type: ignore[arg-type]
            rows[k] = None
            keys[k] = None
        self.dropped = seqs[j - 1]
        self.start = j
        if j >= _COMPACT_MIN and j * 2 >= len(rows):
            del self.seqs[:j]
            del self.cum[:j]
            del rows[:j]
            del keys[:j]
            self.start = 0
        return size


@dataclass(slots=True)
class WorkspaceState:
    """A consistent copy of one workspace, for snapshots."""

    name: str
    head: int
    dropped: int
    seqs: list[int]
    rows: list[bytes]
    keys: list[bytes]
    keyring: list[bytes]
    presence: list[tuple[str, bytes, float]]
    candidates: list[tuple[str, bytes, float]]


class MemoryStore:
    def __init__(self, bounds: Bounds | None = None, epoch: str | None = None) -> None:
        self.bounds = bounds or Bounds()
        self._epoch = epoch or new_epoch()
        self._ws: dict[str, _Workspace] = {}
        self._order: deque[_Workspace] = deque()
        self._stale_total = 0
        self._stored_bytes = 0
        self._side_bytes = 0
        self._envelopes = 0
        self._pairs: dict[str, tuple[str, float]] = {}
        # (expiry, code) of every code, soonest first: expiring is O(log n) per code
        # that goes, never a scan of the codes that stay.
        self._pair_expiry: list[tuple[float, str]] = []
        self._listener: AppendListener | None = None
        # Bumped on every change, so the snapshot writer knows whether to write.
        self.version = 0

    # ----------------------------------------------------------------- basics
    @property
    def epoch(self) -> str:
        return self._epoch

    def adopt_epoch(self, epoch: str) -> None:
        self._epoch = epoch

    def set_listener(self, listener: AppendListener | None) -> None:
        self._listener = listener

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def stats(self) -> Stats:
        return self.stats_now()

    def stats_now(self) -> Stats:
        return Stats(
            workspaces=len(self._ws),
            envelopes=self._envelopes,
            stored_bytes=self._stored_bytes,
            pairings=len(self._pairs),
        )

    def _get(self, ws: str) -> _Workspace:
        w = self._ws.get(ws)
        if w is None:
            w = self._ws[ws] = _Workspace(ws)
        w.touched = time.monotonic()
        return w

    # -------------------------------------------------------------- envelopes
    async def append(self, ws: str, body: bytes, key: bytes) -> tuple[int, bool]:
        w = self._get(ws)
        seen = w.dedup.get(key)
        if seen is not None:
            return seen, True
        seq = max(now_us(), w.head + 1)
        row = encode_row(seq, body)
        w.append_row(seq, row, key)
        self._order.append(w)
        self._stored_bytes += len(row)
        self._envelopes += 1
        self._after_append(w, 1)
        if self._listener is not None:
            self._listener(ws, [(seq, row)])
        return seq, False

    async def append_batch(
        self, ws: str, bodies: list[bytes], keys: list[bytes]
    ) -> list[tuple[int, bool]]:
        # The single-append steps, inlined: a batch is the bulk path (issue 7's target
        # is 100,000 envelopes/s), and attribute lookups per element add up.
        w = self._get(ws)
        dedup = w.dedup
        seqs, cum, rows, row_keys = w.seqs, w.cum, w.rows, w.keys
        total = cum[-1] if cum else 0
        before = total
        head = w.head
        now = now_us()
        out: list[tuple[int, bool]] = []
        fresh: list[tuple[int, bytes]] = []
        for body, key in zip(bodies, keys, strict=True):
            seen = dedup.get(key)
            if seen is not None:
                out.append((seen, True))
                continue
            head = max(now, head + 1)
            row = b'{"seq":%d,"body":%b}' % (head, body)
            total += len(row)
            seqs.append(head)
            cum.append(total)
            rows.append(row)
            row_keys.append(key)
            dedup[key] = head
            out.append((head, False))
            fresh.append((head, row))
        if fresh:
            w.head = head
            self._order.extend(itertools.repeat(w, len(fresh)))
            self._stored_bytes += total - before
            self._envelopes += len(fresh)
            self._after_append(w, len(fresh))
            if self._listener is not None:
                self._listener(ws, fresh)
        return out

    def _after_append(self, w: _Workspace, added: int) -> None:
        self.version += 1
        b = self.bounds
        if b.max_envelopes and w.count > b.max_envelopes:
            self._drop_local(w, w.count - b.max_envelopes)
        if b.retention_secs:
            self._prune_age(w, now_us() - int(b.retention_secs * 1_000_000))
        while self._stored_bytes > b.max_bytes and len(self._order) > 1:
            self._evict_global()
        if self._stale_total > _COMPACT_MIN and self._stale_total * 2 > len(self._order):
            self._compact_order()

    def _drop_local(self, w: _Workspace, n: int = 1) -> None:
        self._stored_bytes -= w.drop_oldest(n)
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
        self._stored_bytes -= w.drop_oldest()
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
        i = bisect.bisect_right(w.seqs, after, w.start, end)
        if i >= end:
            return Page([], w.head, w.oldest, w.dropped, False)
        base = w.cum[i] - len(w.rows[i] or b"")
        j = bisect.bisect_right(w.cum, base + max_bytes, i, min(end, i + limit))
        j = max(j, i + 1)
        rows = w.rows[i:j]
        return Page(rows, w.head, w.oldest, w.dropped, j < end)  # type: ignore[arg-type]

    # ---------------------------------------------------------- side channels
    def _check_side(self, size: int, replaces: int = 0) -> None:
        """Per-entry and relay-wide bounds for side-channel data.

        Side channels get a quarter of the global byte budget. They are never
        evicted (that would lose acknowledged writes), so past it writes are
        refused with 413 until entries are replaced, expire or workspaces go idle.
        """
        if size > self.bounds.max_side_bytes:
            raise StoreFull(
                "too_large",
                f"the entry is {size} bytes; the limit is {self.bounds.max_side_bytes}",
            )
        if self._side_bytes - replaces + size > self.bounds.max_bytes // 4:
            raise StoreFull(
                "relay_full",
                "the relay's storage for keyrings, presence and candidates is full",
            )

    async def keyring_append(self, ws: str, blob: bytes) -> None:
        self._check_side(len(blob))
        w = self._get(ws)
        if len(w.keyring) >= self.bounds.max_keyring:
            raise StoreFull(
                "keyring_full",
                f"the workspace keyring holds its limit of {self.bounds.max_keyring} blobs",
            )
        w.keyring.append(blob)
        w.keyring_bytes += len(blob)
        self._side_bytes += len(blob)
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
        w = self._get(ws)
        entries = self._channel(w, channel)
        self._expire_devices(entries, time.time())
        old = entries.get(device_id)
        self._check_side(len(data), len(old[0]) if old is not None else 0)
        if old is None and len(entries) >= self.bounds.max_devices:
            raise StoreFull(
                "too_many_devices",
                f"the workspace {channel} holds its limit of {self.bounds.max_devices} devices",
            )
        if old is not None:
            self._side_bytes -= len(old[0])
        entries[device_id] = (data, time.time())
        self._side_bytes += len(data)
        self.version += 1

    async def device_map(self, channel: str, ws: str) -> list[tuple[str, bytes]]:
        w = self._ws.get(ws)
        if w is None:
            return []
        entries = self._channel(w, channel)
        self._expire_devices(entries, time.time())
        return [(device, data) for device, (data, _) in entries.items()]

    def _expire_devices(self, entries: dict[str, tuple[bytes, float]], now: float) -> None:
        ttl = self.bounds.presence_ttl
        if not ttl:
            return
        for device in [d for d, (_, at) in entries.items() if now - at > ttl]:
            self._side_bytes -= len(entries.pop(device)[0])
            self.version += 1

    # --------------------------------------------------------------- pairing
    async def pair_create(self, payload: str, ttl: int) -> str:
        now = time.time()
        self._expire_pairs(now)
        if len(self._pairs) >= self.bounds.max_pairings:
            raise StoreBusy(
                "too_many_pairings", "the relay holds too many pairing codes; try again later"
            )
        while True:
            code = "".join(secrets.choice(PAIR_ALPHABET) for _ in range(PAIR_CODE_LEN))
            if code not in self._pairs:
                break
        self._pairs[code] = (payload, now + ttl)
        heapq.heappush(self._pair_expiry, (now + ttl, code))
        self.version += 1
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
        """Expire what has a TTL, prune by age, free idle empty workspaces.

        Returns the number of workspaces freed. Called periodically by the app.
        """
        now = time.time()
        self._expire_pairs(now)
        cutoff = now_us() - int(self.bounds.retention_secs * 1_000_000)
        idle_before = time.monotonic() - self.bounds.idle_workspace_secs
        freed = 0
        for name, w in list(self._ws.items()):
            if self.bounds.retention_secs:
                self._prune_age(w, cutoff)
            self._expire_devices(w.presence, now)
            self._expire_devices(w.candidates, now)
            if w.is_empty() and w.touched < idle_before and not listened(name):
                # Every row it had is already counted stale in _order.
                del self._ws[name]
                freed += 1
        if self._stale_total > _COMPACT_MIN and self._stale_total * 2 > len(self._order):
            self._compact_order()
        return freed

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
                    rows=w.rows[w.start :],  # type: ignore[arg-type]
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
            w = self._get(st.name)
            loaded.append(w)
            for seq, row, key in zip(st.seqs, st.rows, st.keys, strict=True):
                w.append_row(seq, row, key)
                self._stored_bytes += len(row)
                self._envelopes += 1
            w.head = max(w.head, st.head)
            w.dropped = st.dropped
            for blob in st.keyring:
                w.keyring.append(blob)
                w.keyring_bytes += len(blob)
                self._side_bytes += len(blob)
            for device, data, at in st.presence:
                w.presence[device] = (data, at)
                self._side_bytes += len(data)
            for device, data, at in st.candidates:
                w.candidates[device] = (data, at)
                self._side_bytes += len(data)
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
