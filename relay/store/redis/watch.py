"""Live delivery across instances: follow the workspaces with local listeners.

The hub calls `watch(ws)` when a workspace gains its first local subscriber. The
follower then SUBSCRIBEs its channel (one dedicated pub/sub connection), and once
Redis confirms, reads the head: that is the watch's delivered cursor. Reads of a
workspace whose watch is not yet established wait for it (briefly), so every
subscriber's replay read sees at least that head; every later row is published
after the subscription and so reaches the listener. A message whose `prev` is
above the cursor, a message without rows, or a re-subscription after a reconnect
makes the follower read the stream from the cursor instead. The listener thus sees
every row past the cursor once, in seq order, whichever instance appended it.

The follower is transport-neutral; a `_Link` is one pub/sub connection and the
channels subscribed on it. The standalone `Follower` has one link (PUBLISH /
SUBSCRIBE). The `ClusterFollower` has one link per shard primary (SPUBLISH /
SSUBSCRIBE: a notification stays on its workspace's shard), each subscribing only
the watched workspaces whose slot that primary serves. On a failed link, a
server-side SUNSUBSCRIBE (the slot moved away) or a MOVED answer, it re-reads the
slot map, starts links for new primaries, stops those of nodes that are no longer
primaries, and every link subscribes what it now owns. Whatever the transport, a
subscription confirmed for a workspace already established triggers a catch-up
read from its delivered cursor: the no-gap rule after any reconnect or move.

A link is redis-py's public `PubSub`, on a client of its own that never times out
a read and never retries: on any failure the whole connection is dropped and made
afresh, and every channel it owns is subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis import exceptions as rx

from relay.store.base import AppendListener, Page, StoreError, StoreUnavailable, row_seq
from relay.store.redis.connect import Clients, pubsub_options
from relay.store.redis.errors import redis_errors
from relay.store.redis.keys import CONTROL_CHANNEL, channel, channel_ws, ws_keys
from relay.store.redis.slots import Addr, SlotMap

LOG = logging.getLogger("relay.store.redis")

# How long a cancelled background task may take to finish when the store closes.
REAP_SECONDS = 5.0


async def reap(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them, at most REAP_SECONDS in all: closing the
    store (shutdown, a test's teardown) must end even if a task inside the Redis
    client swallows its cancellation and keeps retrying."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=REAP_SECONDS)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a task that failed while stopping is not news
    if pending:
        LOG.warning(
            "closing the Redis store: %d background task(s) did not stop within %.0f s: %s",
            len(pending),
            REAP_SECONDS,
            ", ".join(sorted(t.get_name() for t in pending)),
        )


READY_TIMEOUT = 3.0  # a read of a newly watched workspace waits for its subscription
# Keep-alive, dead-peer detection, reconnect backoff.
PING_EVERY = 3.0
SILENT_LIMIT = 7.0
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
FETCH_ROWS = 256  # rows per catch-up read for a watched workspace
FETCH_BYTES = 4 << 20
FETCH_RETRY = 0.5
SUBSCRIBE_CHUNK = 500  # channels per SUBSCRIBE / UNSUBSCRIBE command
MAP_EVERY = 10.0  # Cluster: the slot map is re-read at least this often
MAP_TROUBLE_EVERY = 0.5  # … and this often while a link is down or a watch has no shard

# A page read of the stream that does not wait for the watch: (ws, after, limit, max_bytes).
ReadFn = Callable[[str, int, int, int], Awaitable[Page]]

_SUB, _UNSUB = 1, 2


class _Watch:
    """A workspace with local listeners: what was delivered to them so far."""

    __slots__ = ("cursor", "dirty", "establishing", "fetching", "ready", "ws")

    def __init__(self, ws: str) -> None:
        self.ws = ws
        self.cursor: int | None = None  # delivered through this seq; None until established
        self.ready = asyncio.Event()  # set once the cursor is known (or on unwatch)
        self.establishing = False
        self.fetching = False
        self.dirty = False


class Follower:
    """Delivery to the local listener, fed by one pub/sub link (one Redis)."""

    def __init__(self, ps_client: Any, redis: Any, read: ReadFn, head_field: str = "h") -> None:
        self._redis = redis  # the store's pooled client, for head lookups
        self._read = read
        # The meta field a watch starts from: "h" (head) or, with replica-acknowledged
        # writes, "c" (the confirmed head: rows past it are not shown to anyone yet).
        self._head_field = head_field
        # For the pub/sub connection: no read timeout, no retries (connect.py).
        self._ps_client: Any = ps_client
        self.listener: AppendListener | None = None
        self._watches: dict[str, _Watch] = {}
        self._links: list[_Link] = []
        if ps_client is not None:
            self._links.append(_Link(self, ps_client.pubsub, sharded=False, name="redis"))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -------------------------------------------------------------- the seam
    def watch(self, ws: str) -> None:
        if ws in self._watches:
            return
        self._watches[ws] = _Watch(ws)
        self._wake_links()

    def unwatch(self, ws: str) -> None:
        w = self._watches.pop(ws, None)
        if w is not None:
            w.ready.set()
            self._wake_links()

    async def wait_ready(self, ws: str) -> None:
        """Before a read of `ws`: wait until its watch (if any) is established."""
        w = self._watches.get(ws)
        if w is None or w.ready.is_set():
            return
        try:
            await asyncio.wait_for(w.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            raise StoreUnavailable("live delivery from the store is not ready") from None

    def appended(self, ws: str, prev: int, rows: list[tuple[int, bytes]]) -> None:
        """Rows this instance appended (prev = the head before them)."""
        w = self._watches.get(ws)
        if w is not None and w.cursor is not None and rows:
            self._apply(w, prev, rows[-1][0], rows)

    def refresh_soon(self) -> None:
        """A write met MOVED: the slot map changed (Cluster only)."""

    def owns(self, link: _Link, ws: str) -> bool:
        """Whether `link` is the one to subscribe `ws` on."""
        return True

    async def run_forever(self) -> None:
        self._closed = False  # a store may be started again after close()
        await self._links[0].run_forever()

    async def close(self) -> None:
        self._closed = True
        await reap(list(self._tasks))
        self._tasks.clear()
        for w in self._watches.values():
            w.ready.set()
        if self._ps_client is not None:
            with contextlib.suppress(Exception):
                await self._ps_client.aclose()

    def _wake_links(self) -> None:
        for link in self._links:
            link.wake.set()

    def _any_up(self) -> bool:
        return any(link.up for link in self._links)

    def link_failed(self, link: _Link) -> None:
        """A link's connection failed; it reconnects by itself."""

    # -------------------------------------------------------------- delivery
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self, ws: str, rows: list[tuple[int, bytes]]) -> None:
        if self.listener is None:
            return
        try:
            self.listener(ws, rows)
        except Exception:  # a listener bug must not stop delivery to others
            LOG.exception("the append listener failed")

    def _apply(self, w: _Watch, prev: int, new: int, rows: list[tuple[int, bytes]] | None) -> None:
        """Rows (prev, new] of w.ws, from a local append or a notification."""
        if w.cursor is None or self._watches.get(w.ws) is not w:
            return  # not established: its catch-up read covers these rows
        if w.fetching:
            w.dirty = True
            return
        if new <= w.cursor:
            return
        if prev > w.cursor or rows is None:
            self._fetch_soon(w)  # rows between the cursor and prev: read them
            return
        fresh = [r for r in rows if r[0] > w.cursor]
        if fresh:
            w.cursor = fresh[-1][0]
            self._notify(w.ws, fresh)

    def _fetch_soon(self, w: _Watch) -> None:
        if w.fetching:
            w.dirty = True
            return
        w.fetching = True
        self._spawn(self._fetch(w))

    async def _fetch(self, w: _Watch) -> None:
        """Deliver every row past the watch's cursor, reading the stream."""
        failed = False
        try:
            while self._watches.get(w.ws) is w and w.cursor is not None:
                w.dirty = False
                page = await self._read(w.ws, w.cursor, FETCH_ROWS, FETCH_BYTES)
                if self._watches.get(w.ws) is not w:
                    return
                fresh = [(row_seq(r), r) for r in page.rows]
                fresh = [r for r in fresh if r[0] > w.cursor]
                if fresh:
                    w.cursor = fresh[-1][0]
                    self._notify(w.ws, fresh)
                if not page.more and not w.dirty:
                    return
        except StoreError:
            failed = True
        finally:
            w.fetching = False
        if failed and self._any_up() and not self._closed:
            # Redis hiccup with pub/sub still up: try again (a pub/sub reconnect
            # catches up by itself).
            asyncio.get_running_loop().call_later(FETCH_RETRY, self._retry_fetch, w)

    def _retry_fetch(self, w: _Watch) -> None:
        if self._watches.get(w.ws) is w and not self._closed:
            self._fetch_soon(w)

    def _establish_soon(self, w: _Watch) -> None:
        if w.establishing or w.cursor is not None:
            return
        w.establishing = True
        self._spawn(self._establish(w))

    async def _establish(self, w: _Watch) -> None:
        """The channel is subscribed (confirmed): the head now is the delivered cursor."""
        try:
            with redis_errors():
                head, confirmed = await self._redis.hmget(ws_keys(w.ws)[2], "h", self._head_field)
            if confirmed is not None:
                head = confirmed  # a missing "c" (older data) reads as the head
        except StoreError:
            w.establishing = False
            # The pub/sub writer retries it on its next pass.
            asyncio.get_running_loop().call_later(FETCH_RETRY, self._wake_links)
            return
        w.establishing = False
        if self._watches.get(w.ws) is not w:
            return
        w.cursor = int(head or 0)
        w.ready.set()
        # Notifications that arrived before the cursor was known were dropped.
        self._fetch_soon(w)

    def _on_message(self, name: bytes, data: bytes) -> None:
        ws = channel_ws(name)
        w = self._watches.get(ws) if ws is not None else None
        if w is None or w.cursor is None:
            return
        header, _, rest = data.partition(b"\n")
        parts = header.split(b" ")
        try:
            prev, new = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            LOG.warning("ignored a malformed notification")
            return
        if len(parts) == 2:
            self._apply(w, prev, new, None)
            return
        rows: list[tuple[int, bytes]] = []
        pos = 0
        try:
            for part in parts[2:]:
                seq_text, _, size_text = part.partition(b":")
                size = int(size_text)
                rows.append((int(seq_text), rest[pos : pos + size]))
                pos += size
        except ValueError:
            self._apply(w, prev, new, None)  # read the stream instead
            return
        self._apply(w, prev, new, rows)

    def subscribed(self, ws: str) -> None:
        """A link confirmed the subscription of ws's channel."""
        w = self._watches.get(ws)
        if w is None:
            self._wake_links()  # no longer wanted: the link unsubscribes
        elif w.cursor is None:
            self._establish_soon(w)
        else:
            self._fetch_soon(w)  # re-subscribed after a reconnect or a move: catch up


class _Link:
    """One pub/sub connection and the workspace channels subscribed on it."""

    def __init__(
        self, follower: Follower, connect: Callable[[], Any], *, sharded: bool, name: str
    ) -> None:
        self.f = follower
        self._connect = connect  # a new redis-py PubSub
        self.sharded = sharded
        self.name = name
        self.chan: dict[str, list[int]] = {}  # ws -> [last command, acks pending]
        self.wake = asyncio.Event()
        self.up = False
        self.closed = False
        self._last_rx = 0.0

    async def run_forever(self) -> None:
        """The pub/sub connection, reconnected with backoff until closed."""
        delay = RECONNECT_MIN
        down_logged = False
        while not self.closed and not self.f._closed:
            pubsub: Any = None
            try:
                pubsub = self._connect()
                self.chan = {}
                self._last_rx = asyncio.get_running_loop().time()
                await pubsub.subscribe(CONTROL_CHANNEL)  # connects
                self.up = True
                if down_logged:
                    LOG.info("Redis pub/sub %s reconnected; catching up watches", self.name)
                    down_logged = False
                delay = RECONNECT_MIN
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._reader(pubsub))
                    tg.create_task(self._writer(pubsub))
            except* Exception as group:
                first = group.exceptions[0]
                if not isinstance(first, rx.RedisError | OSError | TimeoutError):
                    LOG.error("Redis pub/sub listener failed; restarting it", exc_info=first)
                elif not down_logged:
                    LOG.warning("Redis pub/sub connection %s lost: %s", self.name, first)
                    down_logged = True
                self.f.link_failed(self)
            finally:
                self.up = False
                self.chan = {}
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _reader(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await pubsub.get_message(timeout=None)
            self._last_rx = loop.time()
            if msg is None:
                continue
            kind = msg["type"]
            if kind in ("message", "smessage"):
                self.f._on_message(msg["channel"], msg["data"])
            elif kind in ("subscribe", "unsubscribe", "ssubscribe", "sunsubscribe"):
                self._on_ack(kind, msg["channel"])

    def _on_ack(self, kind: str, name: bytes) -> None:
        if name == CONTROL_CHANNEL:
            return
        ws = channel_ws(name)
        st = self.chan.get(ws) if ws is not None else None
        if ws is None or st is None:
            return
        if kind == "sunsubscribe" and st[0] == _SUB:
            # Not asked for: the server dropped it because the slot moved away
            # (resharding) or the node became a replica. The new owner's link
            # subscribes it and catches up from the cursor.
            del self.chan[ws]
            self.f.refresh_soon()
            return
        st[1] -= 1
        if st[1] > 0:
            return
        if st[0] == _UNSUB:
            del self.chan[ws]
            return
        self.f.subscribed(ws)

    async def _writer(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        last_ping = loop.time()
        while True:
            self.wake.clear()
            await self._sync(pubsub)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PING_EVERY):
                    await self.wake.wait()
            now = loop.time()
            if now - self._last_rx > SILENT_LIMIT:
                raise rx.ConnectionError("the Redis pub/sub connection went silent")
            if now - last_ping >= PING_EVERY:
                await pubsub.ping()
                last_ping = now

    async def _sync(self, pubsub: Any) -> None:
        """Subscribe what is watched here, unsubscribe the rest, establish new watches."""
        f = self.f
        subs: list[str] = []
        for ws, w in f._watches.items():
            if not f.owns(self, ws):
                continue
            st = self.chan.get(ws)
            if st is None or st[0] == _UNSUB:
                subs.append(ws)
            elif st[1] == 0 and w.cursor is None:
                f._establish_soon(w)  # already subscribed and confirmed
        unsubs = [
            ws
            for ws, st in self.chan.items()
            if st[0] == _SUB and (ws not in f._watches or not f.owns(self, ws))
        ]
        for ws in subs:
            st = self.chan.setdefault(ws, [_SUB, 0])
            st[0] = _SUB
            st[1] += 1
        for ws in unsubs:
            st = self.chan[ws]
            st[0] = _UNSUB
            st[1] += 1
        if self.sharded:
            # One channel per command: SSUBSCRIBE takes channels of one slot only.
            for ws in subs:
                await pubsub.ssubscribe(channel(ws))
            for ws in unsubs:
                await pubsub.sunsubscribe(channel(ws))
            return
        for i in range(0, len(subs), SUBSCRIBE_CHUNK):
            await pubsub.subscribe(*[channel(ws) for ws in subs[i : i + SUBSCRIBE_CHUNK]])
        for i in range(0, len(unsubs), SUBSCRIBE_CHUNK):
            await pubsub.unsubscribe(*[channel(ws) for ws in unsubs[i : i + SUBSCRIBE_CHUNK]])


class ClusterFollower(Follower):
    """One sharded pub/sub link per shard primary, following the Cluster's slot map."""

    def __init__(
        self, clients: Clients, redis: Any, read: ReadFn, slots: SlotMap, head_field: str = "h"
    ) -> None:
        super().__init__(None, redis, read, head_field)
        self._clients = clients
        self.slots = slots
        self._by_node: dict[Addr, tuple[_Link, asyncio.Task[None], Any]] = {}
        self._refresh = asyncio.Event()

    def refresh_soon(self) -> None:
        self._refresh.set()

    def link_failed(self, link: _Link) -> None:
        self._refresh.set()  # the node may have failed over: read the slot map again

    def owns(self, link: _Link, ws: str) -> bool:
        addr = self.slots.addr_of(channel(ws))
        return addr is not None and f"{addr[0]}:{addr[1]}" == link.name

    def _trouble(self) -> bool:
        if any(not link.up for link in self._links):
            return True
        return any(self.slots.addr_of(channel(ws)) not in self._by_node for ws in self._watches)

    async def run_forever(self) -> None:
        self._closed = False
        try:
            while not self._closed:
                self._refresh.clear()
                if await self.slots.refresh():
                    self._reconcile()
                wait = MAP_TROUBLE_EVERY if self._trouble() else MAP_EVERY
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._refresh.wait()
                if self._refresh.is_set():
                    await asyncio.sleep(0.05)  # gather a burst of triggers into one refresh
        finally:
            for addr in list(self._by_node):
                await self._stop_link(addr)

    def _reconcile(self) -> None:
        """A link for every primary in the slot map, none for other nodes."""
        primaries = self.slots.primaries()
        for addr in list(self._by_node):
            if addr not in primaries:
                self._spawn(self._close_link(self._by_node.pop(addr)))
        assert self._clients.timeouts is not None
        options = pubsub_options(self._clients.timeouts)
        for addr in sorted(primaries):
            if addr in self._by_node:
                continue
            client = self._clients.node_client(addr[0], addr[1], **options)
            name = f"{addr[0]}:{addr[1]}"
            link = _Link(self, client.pubsub, sharded=True, name=name)
            task = asyncio.get_running_loop().create_task(
                link.run_forever(), name=f"redis-spubsub-{name}"
            )
            self._by_node[addr] = (link, task, client)
        self._links = [entry[0] for entry in self._by_node.values()]
        self._wake_links()

    async def _stop_link(self, addr: Addr) -> None:
        entry = self._by_node.pop(addr, None)
        self._links = [e[0] for e in self._by_node.values()]
        if entry is not None:
            await self._close_link(entry)

    async def _close_link(self, entry: tuple[_Link, asyncio.Task[None], Any]) -> None:
        link, task, client = entry
        link.closed = True
        await reap([task])
        with contextlib.suppress(Exception):
            await client.aclose()
        self._wake_links()  # the workspaces it had go to their new owners

    async def close(self) -> None:
        await super().close()
        await self.slots.aclose()
