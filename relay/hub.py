"""Live fan-out: the one place that knows who listens to which workspace.

The store tells the hub of every appended row (`on_append`). The hub wraps
rows in `Item`s whose wire frames (SSE nudge, SSE with body, WebSocket) are
encoded at most once, however many subscribers send them, and hands the same
list to each subscriber of that workspace.

A subscriber's queue is bounded twice: one that falls more than `limit` items,
or more than `max_bytes` bytes of rows, behind is marked overflowed and its
stream ends; the client resumes from its cursor. (An empty queue always takes
the next append, so a single large batch never overflows an idle subscriber.)
Long-poll waiters only need waking and keep no items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Item:
    """One appended row and its lazily encoded frames, shared by every subscriber."""

    __slots__ = ("_nudge", "_sse", "_ws", "row", "seq")

    def __init__(self, seq: int, row: bytes) -> None:
        self.seq = seq
        self.row = row
        self._sse: bytes | None = None
        self._nudge: bytes | None = None
        self._ws: str | None = None

    @property
    def sse_frame(self) -> bytes:
        if self._sse is None:
            self._sse = sse_row_frame(self.seq, self.row)
        return self._sse

    @property
    def nudge_frame(self) -> bytes:
        if self._nudge is None:
            self._nudge = nudge_frame(self.seq)
        return self._nudge

    @property
    def ws_frame(self) -> str:
        if self._ws is None:
            self._ws = ws_env_frame(self.row)
        return self._ws


def nudge_frame(seq: int) -> bytes:
    return b'data: {"seq":%d}\n\n' % seq


def sse_row_frame(seq: int, row: bytes) -> bytes:
    if b"\n" not in row and b"\r" not in row:
        return b"id: %d\ndata: %b\n\n" % (seq, row)
    # A pretty-printed body: one data line per line; EventSource joins them with
    # "\n", which is JSON whitespace, so the event still parses to the same value.
    lines = b"".join(b"data: " + line + b"\n" for line in row.splitlines())
    return b"id: %d\n%b\n" % (seq, lines)


def ws_env_frame(row: bytes) -> str:
    # row is {"seq":N,"body":...}; the frame is {"op":"env","seq":N,"body":...}
    return '{"op":"env",' + row[1:].decode("utf-8")


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Wake:
    """A resettable wake-up flag, lighter than asyncio.Event.

    Thousands of idle streams each hold one: Event keeps a deque of waiters
    (over half a kilobyte even when empty) and wait_for wraps each wait in a
    new Task; this holds one future, only while someone waits.
    """

    __slots__ = ("flag", "waiter")

    def __init__(self) -> None:
        self.flag = False
        self.waiter: asyncio.Future[bool] | None = None

    def set(self) -> None:
        self.flag = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def clear(self) -> None:
        self.flag = False

    def is_set(self) -> bool:
        return self.flag

    async def wait(self, timeout: float | None = None) -> bool:
        """True once set; False if `timeout` seconds pass first."""
        if self.flag:
            return True
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            woken: bool = await waiter
            return woken
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()


class Subscriber:
    __slots__ = (
        "active",
        "closed",
        "items",
        "limit",
        "max_bytes",
        "on_overflow",
        "overflowed",
        "queued_bytes",
        "replaying",
        "wake",
        "ws",
    )

    def __init__(self, ws: str, limit: int, max_bytes: int = 0) -> None:
        self.ws = ws
        self.limit = limit  # 0 = a waiter that keeps no items
        self.max_bytes = max_bytes  # 0 = no byte bound
        self.items: list[Item] = []
        self.queued_bytes = 0  # bytes of the rows in `items`
        self.wake = Wake()
        self.overflowed = False
        self.closed = False
        # While replaying from the store an overflow only means "re-read"; when
        # live, it ends the stream through on_overflow (set by the stream).
        self.replaying = False
        self.on_overflow: Callable[[], None] | None = None
        # False for a WebSocket that only publishes: appends neither queue nor wake it.
        self.active = True

    def push(self, items: list[Item], size: int = 0) -> None:
        """Queue `items` (whose rows hold `size` bytes in all) or overflow."""
        if not self.active:
            return
        if self.limit:
            queued = self.items
            if len(queued) + len(items) > self.limit or (
                self.max_bytes and queued and self.queued_bytes + size > self.max_bytes
            ):
                self.overflowed = True
                queued.clear()
                self.queued_bytes = 0
                if not self.replaying and self.on_overflow is not None:
                    self.on_overflow()
            elif not self.overflowed:
                queued.extend(items)
                self.queued_bytes += size
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    def take(self) -> list[Item]:
        items = self.items
        self.items = []
        self.queued_bytes = 0
        self.wake.clear()
        return items

    async def wait(self, timeout: float | None) -> bool:
        """Wait for items, a wake-up or close; False on timeout.

        The wake flag is cleared by `take()` (or by the caller before it reads the
        store), never here, so a push between the caller's check and this wait
        is not lost.
        """
        if self.items or self.closed or self.overflowed:
            return True
        return await self.wake.wait(timeout)


class Hub:
    """Who listens to which workspace.

    A store whose appends can come from other processes (Redis) passes `watch`
    and `unwatch`: the hub calls them when a workspace gains its first local
    subscriber and loses its last, so the store follows only those workspaces.
    """

    def __init__(
        self,
        watch: Callable[[str], None] | None = None,
        unwatch: Callable[[str], None] | None = None,
    ) -> None:
        self._subs: dict[str, set[Subscriber]] = {}
        self.closing = False
        self._watch = watch
        self._unwatch = unwatch

    def on_append(self, ws: str, rows: list[tuple[int, bytes]]) -> None:
        subs = self._subs.get(ws)
        if not subs:
            return
        items = [Item(seq, row) for seq, row in rows]
        size = sum(len(row) for _, row in rows)
        for sub in subs:
            sub.push(items, size)

    @contextmanager
    def subscribe(self, ws: str, limit: int, max_bytes: int = 0) -> Iterator[Subscriber]:
        sub = Subscriber(ws, limit, max_bytes)
        if self.closing:
            sub.closed = True
        subs = self._subs.get(ws)
        if subs is None:
            subs = self._subs[ws] = set()
            if self._watch is not None:
                self._watch(ws)
        subs.add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(ws)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[ws]
                    if self._unwatch is not None:
                        self._unwatch(ws)

    def listened(self, ws: str) -> bool:
        return ws in self._subs

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def close_all(self) -> None:
        """Shutdown: every live stream ends cleanly at its next step."""
        self.closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.close()
