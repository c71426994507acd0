"""RedisStore: the Store protocol on Redis Streams, one Lua script per write.

The key layout, the notification format and the delivery rules are described in
relay/store/redis/__init__.py; the scripts are relay/store/lua/*.lua.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rx

from relay.store.base import (
    DEVICE_CHANNELS,
    MAX_U64,
    AppendListener,
    Bounds,
    Page,
    Stats,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreUnavailable,
    encode_row,
    new_pair_code,
)
from relay.store.redis import scripts
from relay.store.redis.connect import Timeouts, open_clients
from relay.store.redis.epoch import Epoch
from relay.store.redis.errors import redis_errors, retry_unsent
from relay.store.redis.keys import (
    EPOCH_KEY,
    PAIR_INDEX,
    channel,
    device_keys,
    keyring_key,
    pair_key,
    probe_channel,
    probe_key,
    raw,
    text,
    ws_keys,
)
from relay.store.redis.replicas import ReplicaAck, run_acked, wait_after_probe
from relay.store.redis.slots import SlotMap
from relay.store.redis.stats import StatsCounter
from relay.store.redis.watch import ClusterFollower, Follower, reap

LOG = logging.getLogger("relay.store.redis")

# Bounded waits: a request never hangs on Redis longer than these.
SOCKET_TIMEOUT = 2.0  # a command's reply
CONNECT_TIMEOUT = 1.0  # opening a connection
POOL_SIZE = 64  # connections per relay process (shared by all requests)
POOL_WAIT = 2.0  # waiting for a free pooled connection
START_TIMEOUT = 3.0  # start() gives up on an unreachable Redis (and keeps retrying)
MAINT_EVERY = 1.0  # epoch check, stats flush
PING_EACH = 0.5  # Cluster health: how long one primary may take to answer PING
INLINE_BYTES = 64 * 1024  # rows up to this size ride along in the notification
PAIR_TRIES = 20  # codes drawn before giving up when every one drawn is taken
REDIRECTS = 3  # MOVED/ASK followed by a write sent to a slot's node (Cluster, WAIT)


class RedisStore:
    def __init__(
        self,
        url: str,
        bounds: Bounds | None = None,
        *,
        min_replicas: int = 0,
        wait_ms: int = 500,
    ) -> None:
        self.url = url
        self.bounds = bounds or Bounds()
        self._ack = ReplicaAck(min_replicas, wait_ms)
        # A write's WAIT must not outlast the reply timeout of its own connection.
        socket_timeout = SOCKET_TIMEOUT + (wait_ms / 1000 if min_replicas else 0.0)
        self._clients = open_clients(
            url, Timeouts(socket_timeout, CONNECT_TIMEOUT, POOL_SIZE, POOL_WAIT)
        )
        self._redis: Any = self._clients.redis
        self._cluster = self._clients.cluster
        self._publish = "SPUBLISH" if self._cluster else "PUBLISH"
        self._nodes: dict[tuple[str, int], Any] = {}  # Cluster: a client per node, for WAIT
        self._epoch = Epoch()
        self._stats = StatsCounter()
        self._follower: Follower
        head_field = "c" if min_replicas else "h"
        if self._cluster:
            self._slots = SlotMap(self._clients)
            self._follower = ClusterFollower(
                self._clients, self._redis, self._read_page, self._slots, head_field
            )
        else:
            self._follower = Follower(
                self._clients.pubsub, self._redis, self._read_page, head_field
            )
        self._background: list[asyncio.Task[Any]] = []
        # Rows past the confirmed head older than this lost their writer (see _pending).
        self._confirm_grace = wait_ms / 1000 + socket_timeout
        self._confirming: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        ttl_ms = int(self.bounds.retention_secs * 1000)
        self._expire_ms = ttl_ms + 1000 if ttl_ms else 0
        self._retention_us = int(self.bounds.retention_secs * 1_000_000)

    # ------------------------------------------------------------------ basics
    @property
    def epoch(self) -> str:
        return self._epoch.value or "unknown"

    def set_listener(self, listener: AppendListener | None) -> None:
        self._follower.listener = listener

    def _where(self) -> str:
        return self._clients.where

    async def start(self) -> None:
        self._closed = False
        self._background = [
            asyncio.create_task(self._follower.run_forever(), name="redis-pubsub"),
            asyncio.create_task(self._maintain_forever(), name="redis-maintenance"),
        ]

        try:
            async with asyncio.timeout(START_TIMEOUT):
                with redis_errors():
                    await scripts.load_all(self._redis)
                    await self._epoch.check(self._redis)
                    await self._check_config()
        except (StoreError, TimeoutError):
            LOG.warning(
                "Redis at %s is not reachable; the relay answers 503 until it is", self._where()
            )
            return
        LOG.info("Redis store at %s, epoch %s", self._where(), self._epoch.value)

    async def _check_config(self) -> None:
        """Warn about Redis settings that can lose acknowledged envelopes."""
        if self._cluster:
            await self._redis.initialize()
            for node in self._redis.get_primaries():
                await self._check_node_config(self._node(node.host, node.port))
        else:
            await self._check_node_config(self._redis)
        LOG.info(
            "the relay-wide byte budget is Redis maxmemory with the Redis store "
            "(HIVE_RELAY_MAX_BYTES applies to the memory store only)"
        )

    async def _check_node_config(self, redis: Any) -> None:
        try:
            policy = await redis.config_get("maxmemory-policy")
            persistence = await redis.info("persistence")
        except rx.ResponseError:  # CONFIG/INFO disabled (managed Redis): nothing to say
            return
        value = policy.get(b"maxmemory-policy") or policy.get("maxmemory-policy")
        if isinstance(value, bytes):
            value = value.decode()
        if value and value != "noeviction":
            LOG.warning(
                "Redis maxmemory-policy is %s: Redis may evict envelopes silently; "
                "set maxmemory-policy noeviction (see docs/scaling.md)",
                value,
            )
        if not persistence.get("aof_enabled"):
            LOG.warning(
                "Redis AOF is off: a Redis restart may lose acknowledged envelopes; "
                "set appendonly yes (see docs/scaling.md)"
            )

    async def close(self) -> None:
        self._closed = True
        tasks = self._background
        await reap([*tasks, *self._tasks])
        self._background = []
        self._tasks.clear()
        self._confirming.clear()
        await self._follower.close()
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._stats.flush(self._redis)
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.aclose()
        with contextlib.suppress(Exception):
            await self._clients.aclose()

    async def ping(self) -> bool:
        try:
            with redis_errors():
                if self._cluster:
                    return await self._ping_cluster()
                return bool(await self._redis.ping())
        except StoreError:
            return False

    async def _ping_cluster(self) -> bool:
        """Healthy while some shard primary answers: one shard failing over leaves the
        other shards' workspaces working, so the relay stays in its load balancer."""
        if not self._slots.known:
            await self._slots.refresh()
        for host, port in sorted(self._slots.primaries()):
            with contextlib.suppress(rx.RedisError, OSError, TimeoutError, RuntimeError):
                async with asyncio.timeout(PING_EACH):
                    if await self._node(host, port).ping():
                        return True
        return False

    async def _maintain_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(MAINT_EVERY)
            try:
                with redis_errors():
                    await self._epoch.check(self._redis)
                await self._stats.refresh(self._redis)
            except StoreError:
                pass

    # ------------------------------------------------------------------ writes
    async def _acked(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a write script; with MIN_REPLICAS, WAIT on the connection that ran it."""
        if not self._cluster:
            return await run_acked(self._redis, name, keys, args, self._ack)
        if self._ack.count <= 0:
            return await scripts.run(self._redis, name, keys, args)  # MOVED/ASK: redis-py
        return await self._on_slot_node(
            keys[0],
            lambda r, asking: run_acked(r, name, keys, args, self._ack, asking=asking),
        )

    def _node(self, host: str, port: int) -> Any:
        client = self._nodes.get((host, port))
        if client is None:
            client = self._clients.node_pool_client(host, port)
            self._nodes[(host, port)] = client
        return client

    async def _on_slot_node(self, key: str, run: Callable[[Any, bool], Awaitable[Any]]) -> Any:
        """`run(client, asking)` on the primary that owns key's slot, following MOVED/ASK.

        WAIT counts the writes of its own connection, so a replica-acknowledged
        write goes to a plain client of the slot's node rather than through
        RedisCluster (whose pipeline takes no scripts).
        """
        addr = self._slots.addr_of(key)
        if addr is None and await self._slots.refresh():
            addr = self._slots.addr_of(key)
        if addr is None:  # no primary serves the slot (now)
            raise StoreUnavailable(retry_after=1)
        (host, port), asking = addr, False
        for _ in range(REDIRECTS):
            try:
                return await run(self._node(host, port), asking)
            except rx.MovedError as exc:  # the slot lives elsewhere now
                host, port, asking = exc.host, int(exc.port), False
                self._slots.moved(key, (host, port))
                self._follower.refresh_soon()
            except rx.AskError as exc:  # the slot is migrating; this key already moved
                host, port, asking = exc.host, int(exc.port), True
        raise StoreUnavailable(retry_after=1)

    # --------------------------------------------------------------- envelopes
    async def append(self, ws: str, body: bytes, key: bytes) -> tuple[int, bool]:
        return (await self._append(ws, [body], [key]))[0]

    async def append_batch(
        self, ws: str, bodies: list[bytes], keys: list[bytes]
    ) -> list[tuple[int, bool]]:
        if len(bodies) != len(keys):
            raise ValueError("append_batch: one key per body")
        if not bodies:
            return []
        return await self._append(ws, bodies, keys)

    async def _append(
        self, ws: str, bodies: list[bytes], keys: list[bytes]
    ) -> list[tuple[int, bool]]:
        acked = self._ack.count > 0
        args: list[Any] = [
            self.bounds.max_envelopes,
            self._retention_us,
            # With replica acks the script publishes nothing: _commit does, after WAIT.
            b"" if acked else channel(ws),
            INLINE_BYTES,
            self._expire_ms,
            self._publish,
        ]
        for key, body in zip(keys, bodies, strict=True):
            args.append(key)
            args.append(body)
        with redis_errors():
            reply = await self._acked("append", list(ws_keys(ws)), args)
            prev, created, added, added_b, drop_n, drop_b, flat, msg = reply
            results = [(int(flat[i]), bool(flat[i + 1])) for i in range(0, len(flat), 2)]
            if not added:
                # All duplicates: the rows were stored by an earlier write, perhaps
                # one answered 503 for want of replicas; they must be on them now.
                await self._wait_probe(ws)
            if acked:
                # WAIT saw every row of this call on enough replicas: only now may
                # readers and subscribers on any relay see them.
                await self._commit(ws, max(seq for seq, _ in results), msg)
        if added:
            self._stats.count(int(created), int(added) - int(drop_n), int(added_b) - int(drop_b))
            rows = [
                (seq, encode_row(seq, body))
                for (seq, dup), body in zip(results, bodies, strict=True)
                if not dup
            ]
            self._follower.appended(ws, int(prev), rows)
        return results

    async def _wait_probe(self, ws: str) -> None:
        """WAIT for `ack.count` replicas behind a fresh write in the slot of `ws`."""
        if self._ack.count <= 0:
            return
        if self._cluster:
            await self._on_slot_node(
                probe_key(ws),
                lambda r, asking: wait_after_probe(
                    r, b"", self._ack, probe_key=probe_key(ws), asking=asking
                ),
            )
        else:
            await wait_after_probe(self._redis, probe_channel(ws), self._ack)

    async def _commit(self, ws: str, seq: int, msg: bytes) -> None:
        """Move the confirmed head of `ws` up to `seq` and announce it (commit.lua)."""
        # Routed by the meta key: in a Cluster, the slot's primary runs it (SPUBLISH).
        args = [channel(ws), seq, msg, self._publish]
        await scripts.run(self._redis, "commit", [ws_keys(ws)[2]], args)

    def _pending(self, ws: str, age_us: int) -> None:
        """A read saw rows past the confirmed head, the oldest `age_us` old.

        Their writer normally confirms them within its WAIT. One that never does (a
        503 whose client gave up, a relay that died between WAIT and commit, a
        failover that kept the rows but lost the commit) is confirmed here once the
        writer's time is up: WAIT behind a fresh write, then commit, so they too are
        shown only once enough replicas hold them.
        """
        if ws in self._confirming or self._closed:
            return
        delay = max(0.0, self._confirm_grace - age_us / 1_000_000)
        self._confirming.add(ws)
        task = asyncio.get_running_loop().create_task(self._confirm(ws, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm(self, ws: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            with redis_errors():
                head, confirmed = await self._redis.hmget(ws_keys(ws)[2], "h", "c")
                if head is None or confirmed is None or int(confirmed) >= int(head):
                    return
                # The probe is sent after `head` was read: WAIT covers every row up to it.
                await self._wait_probe(ws)
                await self._commit(ws, int(head), b"")
        except StoreError as exc:
            LOG.info("could not confirm the unconfirmed rows of a workspace yet: %s", exc)
        finally:
            self._confirming.discard(ws)

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        await self._follower.wait_ready(ws)
        return await self._read(ws, after, limit, max_bytes, with_epoch=True)

    async def _read_page(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        return await self._read(ws, after, limit, max_bytes, with_epoch=False)

    async def _read(
        self, ws: str, after: int, limit: int, max_bytes: int, with_epoch: bool
    ) -> Page:
        log, _, meta = ws_keys(ws)
        start = f"{after + 1}-0" if 0 <= after < MAX_U64 else ""
        confirmed = "1" if self._ack.count > 0 else ""
        args = [start, max(1, min(limit, 1 << 40)), max(1, max_bytes), confirmed]
        with redis_errors():
            if with_epoch and self._cluster:
                # The epoch key lives in another slot (another node, perhaps): both
                # are asked at once (a ClusterPipeline does not take EVALSHA).
                # Not asyncio.gather: a stream whose client left is cancelled by its
                # anyio cancel scope, and a cancellation that came back out of gather's
                # children lost the scope's mark, so it escaped as an error (a logged
                # traceback per disconnect mid-replay). The read is awaited here, the
                # epoch's task only through asyncio.wait, which passes the cancel on as is.
                epoch_task = asyncio.get_running_loop().create_task(
                    retry_unsent(lambda: self._redis.get(EPOCH_KEY))
                )
                try:
                    res = await scripts.run(self._redis, "read", [log, meta], args)
                    await asyncio.wait([epoch_task])
                finally:
                    if not epoch_task.done():
                        epoch_task.cancel()
                    elif not epoch_task.cancelled():
                        epoch_task.exception()  # retrieved: no "never retrieved" warning
                failed = epoch_task.exception()
                epoch: Any = failed if failed is not None else epoch_task.result()
                if not isinstance(epoch, BaseException):
                    await self._epoch.check(self._redis, epoch, known=True)
                elif not self._epoch.value:
                    raise epoch
                # else: the epoch's shard is down, this workspace's is not: the epoch
                # known (checked each second while reachable) answers, so one shard
                # failing over does not stop reads on the others.
            elif with_epoch:
                # The epoch rides in the same round trip, so every read notices a
                # Redis that lost its dataset.
                for attempt in (0, 1):
                    try:
                        async with self._redis.pipeline(transaction=False) as pipe:
                            pipe.evalsha(scripts.SHAS["read"], 2, log, meta, *args)
                            pipe.get(EPOCH_KEY)
                            res, epoch = await pipe.execute()
                        break
                    except rx.NoScriptError:
                        if attempt:
                            raise
                        await self._redis.script_load(scripts.SCRIPTS["read"])
                await self._epoch.check(self._redis, epoch, known=True)
            else:
                res = await scripts.run(self._redis, "read", [log, meta], args)
        head, oldest, dropped, more, rows, pending = res
        if int(pending) >= 0:
            self._pending(ws, int(pending))
        return Page(list(rows), int(head), int(oldest), int(dropped), bool(more))

    # ------------------------------------------------------------ live delivery
    def watch(self, ws: str) -> None:
        """The hub's first local subscriber of `ws` arrived: follow its appends."""
        self._follower.watch(ws)

    def unwatch(self, ws: str) -> None:
        self._follower.unwatch(ws)

    # ------------------------------------------------------------ side channels
    def _check_side(self, size: int) -> None:
        if size > self.bounds.max_side_bytes:
            raise StoreFull(
                "too_large",
                f"the entry is {size} bytes; the limit is {self.bounds.max_side_bytes}",
            )

    async def keyring_append(self, ws: str, blob: bytes) -> None:
        self._check_side(len(blob))
        with redis_errors():
            ok = await self._acked("keyring", [keyring_key(ws)], [self.bounds.max_keyring, blob])
        if not ok:
            raise StoreFull(
                "keyring_full",
                f"the workspace keyring holds its limit of {self.bounds.max_keyring} blobs",
            )

    async def keyring_list(self, ws: str) -> list[bytes]:
        with redis_errors():
            return list(await retry_unsent(lambda: self._redis.lrange(keyring_key(ws), 0, -1)))

    @staticmethod
    def _device_keys(channel: str, ws: str) -> list[str]:
        if channel not in DEVICE_CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {DEVICE_CHANNELS}")
        return device_keys(channel, ws)

    async def device_put(self, channel: str, ws: str, device_id: str, data: bytes) -> None:
        self._check_side(len(data))
        keys = self._device_keys(channel, ws)
        args = [raw(device_id), data, self.bounds.presence_ttl, self.bounds.max_devices]
        with redis_errors():
            ok = await self._acked("device_put", keys, args)
        if not ok:
            raise StoreFull(
                "too_many_devices",
                f"the workspace {channel} holds its limit of {self.bounds.max_devices} devices",
            )

    async def device_map(self, channel: str, ws: str) -> list[tuple[str, bytes]]:
        keys = self._device_keys(channel, ws)
        with redis_errors():
            flat = await scripts.run(self._redis, "device_map", keys, [self.bounds.presence_ttl])
        return [(text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

    # ----------------------------------------------------------------- pairing
    async def pair_create(self, payload: str, ttl: int) -> str:
        for _ in range(PAIR_TRIES):
            code = new_pair_code()
            keys = [pair_key(code), PAIR_INDEX]
            args = [raw(payload), int(ttl * 1000), self.bounds.max_pairings, code]
            with redis_errors():
                res = await self._acked("pair_create", keys, args)
            if res == 1:
                return code
            if res == -1:
                raise StoreBusy(
                    "too_many_pairings", "the relay holds too many pairing codes; try again later"
                )
        raise StoreBusy("too_many_pairings", "no free pairing code; try again later")

    async def pair_resolve(self, code: str) -> str | None:
        with redis_errors():
            value = await retry_unsent(lambda: self._redis.get(pair_key(code)))
        return None if value is None else text(value)

    # ------------------------------------------------------------------ stats
    def stats_now(self) -> Stats:
        """Cheap and approximate: the last relay-wide counters plus local changes since."""
        return self._stats.now()

    async def stats(self) -> Stats:
        with contextlib.suppress(StoreError):
            await self._stats.refresh(self._redis)
        return self._stats.now()
