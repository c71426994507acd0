"""The Store protocol: everything the API needs from storage.

A store keeps, per workspace, an append-only log of opaque envelope bodies with
relay-assigned sequence numbers, plus the small side channels (keyring, presence,
candidates) and the relay-wide pairing codes. API code never knows which store it
has; tests/test_store_conformance.py runs the same cases against every store.

Rows are handed out already encoded as `{"seq":N,"body":<body>}` bytes, made once
at append time, so a read is a join of byte strings and never re-encodes a body.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from relay.wire import Buffer, Buffers

# A listener is told, synchronously and in seq order, of every row appended to a
# workspace: (workspace, [(seq, row_bytes), ...]).
AppendListener = Callable[[str, list[tuple[int, bytes]]], None]

# Side channels that hold one entry per device.
DEVICE_CHANNELS = ("presence", "candidates")


# The largest cursor or seq the API accepts: seqs and cursors are unsigned 64-bit.
MAX_U64 = (1 << 64) - 1

# Pairing codes: six characters of Crockford's base32 alphabet (no I, L, O, U), so a
# code read aloud or typed from a screen is hard to get wrong.
PAIR_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PAIR_CODE_LEN = 6


def new_pair_code() -> str:
    return "".join(secrets.choice(PAIR_ALPHABET) for _ in range(PAIR_CODE_LEN))


def new_epoch() -> str:
    """A fresh name for a store's history (16 hex digits)."""
    return secrets.token_hex(8)


def next_seq(head: int, now_us: int) -> int:
    """The seq rule (docs/protocol.md): the append time in Unix microseconds, or head + 1.

    A seq never rewinds as long as the clock does not go back and a workspace does
    not sustain over a million appends a second; the Redis append script applies
    the same rule with Redis TIME.
    """
    return max(now_us, head + 1)


class StoreError(Exception):
    """Base class of errors a store reports to the API layer (relay.errors maps them to HTTP)."""

    code = "store_error"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class StoreFull(StoreError):
    """A bound was reached; the write was refused and nothing changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StoreBusy(StoreError):
    """A relay-wide bound that will clear by itself (expiring entries)."""

    def __init__(self, code: str, message: str, retry_after: int = 60) -> None:
        super().__init__(message, retry_after)
        self.code = code


class StoreUnavailable(StoreError):
    """The backend cannot be reached; the request may be retried."""

    code = "store_unavailable"

    def __init__(self, message: str = "the store is unavailable", retry_after: int = 1) -> None:
        super().__init__(message, retry_after)


class Page:
    """One answer to a cursor read.

    A store gives either the rows (`rows`) or, for the memory store, the page's
    JSON body as a few buffers (`parts`: slices of its row chunks, the brackets
    included) and the rows' end offsets (`bounds`, cumulative row bytes, the
    first being where the page starts), from which `rows` is built when asked.
    """

    __slots__ = ("_bounds", "_parts", "_rows", "dropped", "head", "more", "oldest")

    def __init__(
        self,
        rows: list[bytes] | None,
        head: int,
        oldest: int,
        dropped: int,
        more: bool,
        parts: list[Buffer] | None = None,
        bounds: Sequence[int] | None = None,
    ) -> None:
        self._rows = rows
        self.head = head  # highest seq ever assigned in the workspace (0 if none)
        self.oldest = oldest  # lowest retained seq (0 if none)
        self.dropped = dropped  # highest seq the relay dropped (0 if none)
        self.more = more  # rows past this page remain
        self._parts = parts
        self._bounds = bounds

    @property
    def rows(self) -> list[bytes]:
        """The encoded rows, oldest first."""
        rows = self._rows
        if rows is None:
            rows = self._rows = self._split()
        return rows

    @property
    def empty(self) -> bool:
        if self._rows is not None:
            return not self._rows
        return self._bounds is None or len(self._bounds) < 2

    def _split(self) -> list[bytes]:
        bounds = self._bounds
        if bounds is None or len(bounds) < 2:
            return []
        body = self.json()
        out = []
        pos = 1
        prev = bounds[0]
        for end in itertools.islice(bounds, 1, None):
            n = end - prev
            out.append(body[pos : pos + n])
            pos += n + 1
            prev = end
        return out

    def gap(self, after: int) -> bool:
        """True when the caller's cursor is below what retention already dropped."""
        return after < self.dropped

    def json(self) -> bytes:
        parts = self._parts
        if parts is not None:
            return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[return-value]
        rows = self.rows
        if len(rows) <= 1:
            return b"[" + rows[0] + b"]" if rows else b"[]"
        # One join, no concatenation of the big result: for a multi-megabyte page,
        # b"[" + joined + b"]" costs twenty times the join itself.
        return b",".join([b"[" + rows[0], *rows[1:-1], rows[-1] + b"]"])

    def body(self, vectored: bool) -> bytes | Buffers:
        """The JSON body; as its pieces when the server writes them itself (relay.wire)."""
        parts = self._parts
        if vectored and parts is not None and len(parts) > 1:
            return Buffers(parts)
        return self.json()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Page):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def _key(self) -> tuple[list[bytes], int, int, int, bool]:
        return (self.rows, self.head, self.oldest, self.dropped, self.more)

    def __repr__(self) -> str:
        return "Page(rows=%r, head=%d, oldest=%d, dropped=%d, more=%r)" % self._key()


# What the memory store charges against HIVE_RELAY_MAX_BYTES for each item it holds,
# on top of the item's own bytes: the Python objects, list and array slots and hash
# table entries that hold it, as measured on CPython 3.11 (docs/security.md, "Memory
# budget"). A retained envelope costs its row, its dedup key and ENVELOPE_OVERHEAD; a
# workspace its id and WORKSPACE_OVERHEAD; a presence or candidate entry its device id,
# its data and DEVICE_OVERHEAD; a keyring blob its bytes and BLOB_OVERHEAD.
ENVELOPE_OVERHEAD = 200
WORKSPACE_OVERHEAD = 1024
DEVICE_OVERHEAD = 160
BLOB_OVERHEAD = 48


def workspace_charge(ws: str) -> int:
    return WORKSPACE_OVERHEAD + len(ws)  # ids are ASCII (the API checks them)


def device_charge(device_id: str, data: bytes) -> int:
    return DEVICE_OVERHEAD + len(device_id.encode("utf-8", "surrogatepass")) + len(data)


@dataclass(slots=True, frozen=True)
class Bounds:
    max_envelopes: int = 50_000  # 0 = unbounded
    retention_secs: float = 0.0  # 0 = off
    max_bytes: int = 1 << 30
    max_keyring: int = 1000
    max_devices: int = 1000
    max_side_bytes: int = 256 * 1024
    max_pairings: int = 100_000
    presence_ttl: float = 0.0  # 0 = never
    idle_workspace_secs: float = 3600.0


@dataclass(slots=True, frozen=True)
class Stats:
    workspaces: int
    envelopes: int
    stored_bytes: int
    pairings: int


_ROW_PREFIX = b'{"seq":'


def encode_row(seq: int, body: bytes) -> bytes:
    return b'{"seq":%d,"body":%b}' % (seq, body)


def row_seq(row: bytes) -> int:
    return int(row[len(_ROW_PREFIX) : row.index(b",", len(_ROW_PREFIX))])


def row_body(row: bytes) -> bytes:
    start = row.index(b',"body":', len(_ROW_PREFIX)) + len(b',"body":')
    return row[start:-1]


class Store(Protocol):
    """What a store offers. All methods may raise `StoreError` subclasses."""

    @property
    def epoch(self) -> str:
        """Names the store's history; changes when acknowledged envelopes may be lost."""
        ...

    def set_listener(self, listener: AppendListener | None) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def append(self, ws: str, body: bytes, key: bytes) -> tuple[int, bool]:
        """Append one body; returns (seq, duplicate)."""
        ...

    async def append_batch(
        self, ws: str, bodies: list[bytes], keys: list[bytes]
    ) -> list[tuple[int, bool]]:
        """Append bodies in order, each deduplicated by its key; all or nothing."""
        ...

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Page: ...

    async def keyring_append(self, ws: str, blob: bytes) -> None: ...

    async def keyring_list(self, ws: str) -> list[bytes]: ...

    async def device_put(self, channel: str, ws: str, device_id: str, data: bytes) -> None: ...

    async def device_map(self, channel: str, ws: str) -> list[tuple[str, bytes]]: ...

    async def pair_create(self, payload: str, ttl: int) -> str: ...

    async def pair_resolve(self, code: str) -> str | None: ...

    async def stats(self) -> Stats: ...


# Optional capabilities. The app asks for each with isinstance() at start-up, so a
# store offers what it can and the type checker knows the signatures.
@runtime_checkable
class WatchingStore(Protocol):
    """A store fed by other processes: it follows only workspaces the hub watches."""

    def watch(self, ws: str) -> None:
        """The first local subscriber of `ws` arrived: deliver its appends to the listener."""
        ...

    def unwatch(self, ws: str) -> None: ...


@runtime_checkable
class SweepingStore(Protocol):
    """A store that expires and frees things itself, a bounded step at a time."""

    def sweep_steps(self, listened: Callable[[str], bool] = ...) -> Iterator[int]:
        """Yields after each step (workspaces freed so far); the caller yields in between."""
        ...


@runtime_checkable
class LocalStatsStore(Protocol):
    """A store that can tell its counters without I/O (for the metrics gauges)."""

    def stats_now(self) -> Stats: ...


@runtime_checkable
class BudgetedStore(Protocol):
    """A store that charges what it holds against HIVE_RELAY_MAX_BYTES itself."""

    def charged_now(self) -> tuple[int, int]:
        """(envelopes and workspaces, side-channel entries) as charged to the budget."""
        ...

    def set_listened(self, listened: Callable[[str], bool]) -> None:
        """Tells the store which workspaces have live listeners (never freed early)."""
        ...


@runtime_checkable
class PageCachingStore(Protocol):
    """A store that keeps read answers until the workspace they show changes.

    The API builds the answer (body and headers) of a cursor read once and serves
    it to every reader who asks with the same query until the store drops it. The
    store drops a workspace's answers on every change a page could show (appends,
    drops, the drop horizon, the durable mark, the epoch), so a cached answer is
    always byte for byte what a fresh read would build.
    """

    def cached_page(self, ws: str, key: Any) -> Any:
        """The answer cached for `key` in `ws`, or None."""
        ...

    def cache_page(self, ws: str, key: Any, page: Any, size: int) -> None:
        """Keep `page` for `key` until `ws` changes; call with no await since the read."""
        ...

    @property
    def page_cache_used(self) -> int:
        """Bytes the cached answers hold."""
        ...
