"""The Redis Streams store: history that survives relay restarts, shared by many relays.

Selected by `HIVE_RELAY_STORE=redis://…` or `rediss://…` (TLS); needs the `redis`
extra and Redis 6.2 or newer. Every instance behind a load balancer talks to the
same Redis, so any instance can serve any request (no sticky sessions).

Key layout. All keys of a workspace share the hash tag `{ws}`, so they live in one
Redis Cluster slot and every Lua script touches one slot only:

    relay:{ws}:log        Stream. Entry id `<seq>-0`, fields r=<encoded row>, k=<dedup key>
    relay:{ws}:dedup      Hash  dedup key -> seq, for retained rows only
    relay:{ws}:meta       Hash  h=head, d=dropped horizon, n=retained rows, b=retained bytes
    relay:{ws}:keyring    List  of blobs
    relay:{ws}:presence   Hash  device -> data     (and relay:{ws}:presence:t, a sorted set
    relay:{ws}:candidates Hash  device -> data      device -> last write time, for the TTL)
    relay:{pair}:c:<CODE> String payload, with the pairing TTL as Redis expiry
    relay:{pair}:idx      Sorted set code -> expiry (ms), to bound the number of codes
    relay:epoch           String: names this Redis dataset's history
    relay:stats           Hash: approximate relay-wide counters for the status page

Appends are one Lua script (atomic, all or nothing for a batch): dedup by key, seq =
max(Redis TIME in µs, head + 1), XADD, trim by count and age (forgetting the dedup
keys of dropped rows and recording the dropped horizon), and PUBLISH on the
workspace's channel `relay:{ws}:n`. The message is `<prev head> <new head> [<seq>:<len>
…]\\n<rows…>`: the rows ride along when small, so a listening relay usually delivers
without reading the stream back.

Live delivery across instances. The hub calls `watch(ws)` when a workspace gains
its first local subscriber. The store then SUBSCRIBEs (one dedicated pub/sub
connection), and once Redis confirms, reads the head: that is the watch's delivered
cursor. Reads of a workspace whose watch is not yet established wait for it (briefly),
so every subscriber's replay read sees at least that head; every later row is
published after the subscription and so reaches the listener. A message whose
`prev` is above the cursor, a message without rows, or a re-subscription after a
reconnect makes the store read the stream from the cursor instead. The listener
thus sees every row past the cursor once, in seq order, whichever instance appended it.

The epoch lives in `relay:epoch`, created with SET NX. Every read fetches it in the
same round trip, and a background task checks it each second: a missing key means
Redis lost its dataset (flushed or replaced), and a new epoch is created (SET NX, so
every instance adopts the same one).

Relay-wide byte budgets (HIVE_RELAY_MAX_BYTES, the side-channel share of it) are
not enforced here: set Redis `maxmemory` with `maxmemory-policy noeviction`; past it
Redis refuses writes and the relay answers 503 `relay_full` with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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
    new_epoch,
    new_pair_code,
    row_seq,
)

LOG = logging.getLogger("relay.store.redis")

# Bounded waits: a request never hangs on Redis longer than these.
SOCKET_TIMEOUT = 2.0  # a command's reply
CONNECT_TIMEOUT = 1.0  # opening a connection
POOL_SIZE = 64  # connections per relay process (shared by all requests)
POOL_WAIT = 2.0  # waiting for a free pooled connection
READY_TIMEOUT = 3.0  # a read of a newly watched workspace waits for its subscription
START_TIMEOUT = 3.0  # start() gives up on an unreachable Redis (and keeps retrying)
# The pub/sub connection: keep-alive, dead-peer detection, reconnect backoff.
PING_EVERY = 3.0
SILENT_LIMIT = 7.0
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
MAINT_EVERY = 1.0  # epoch check, stats flush
FETCH_ROWS = 256  # rows per catch-up read for a watched workspace
FETCH_BYTES = 4 << 20
FETCH_RETRY = 0.5
INLINE_BYTES = 64 * 1024  # rows up to this size ride along in the notification
BUSY_RETRY_AFTER = 30

EPOCH_KEY = "relay:epoch"
STATS_KEY = "relay:stats"
PAIR_INDEX = "relay:{pair}:idx"
CONTROL_CHANNEL = b"relay:ctl"
_CHAN_PREFIX = b"relay:{"
_CHAN_SUFFIX = b"}:n"

# ------------------------------------------------------------------- scripts
# Lua numbers are doubles: seqs (µs since 1970, < 2^53) are exact. fmt() prints them
# without an exponent.
_LUA_COMMON = r"""
local function fmt(n) return string.format('%.0f', n) end
local function id_seq(id) return tonumber(string.match(id, '^(%d+)')) end
"""

APPEND_LUA = (
    _LUA_COMMON
    + r"""
-- KEYS: log, dedup, meta
-- ARGV: max_envelopes, retention_us, channel, inline_bytes, expire_ms, (key, body)...
local log, dedup, meta = KEYS[1], KEYS[2], KEYS[3]
local max_n = tonumber(ARGV[1])
local ret_us = tonumber(ARGV[2])
local inline = tonumber(ARGV[4])
local expire_ms = tonumber(ARGV[5])
local CAP = 10000

local m = redis.call('HMGET', meta, 'h', 'd', 'n', 'b')
local head = tonumber(m[1]) or 0
local dropped = tonumber(m[2]) or 0
local count = tonumber(m[3]) or 0
local bytes = tonumber(m[4]) or 0
local prev = head
local created = 0
if not m[1] then created = 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- Pass 1, read-only: dedup and seq assignment. Nothing is written before every
-- element is decided, so an error (or OOM on the first write) leaves no trace.
local out, fresh, seen = {}, {}, {}
for i = 6, #ARGV, 2 do
  local key = ARGV[i]
  local s = seen[key]
  if not s then
    local v = redis.call('HGET', dedup, key)
    if v then s = tonumber(v) end
  end
  if s then
    out[#out + 1] = s
    out[#out + 1] = 1
  else
    head = math.max(now, head + 1)
    seen[key] = head
    fresh[#fresh + 1] = i
    out[#out + 1] = head
    out[#out + 1] = 0
  end
end
if #fresh == 0 then
  return {prev, 0, 0, 0, 0, 0, out}
end

local drop_n, drop_b = 0, 0
if count > 0 and redis.call('EXISTS', log) == 0 then
  -- Age retention expired the whole idle log (see PEXPIRE below).
  drop_n, drop_b = count, bytes
  if prev > dropped then dropped = prev end
  bytes = 0
end

-- Pass 2: write.
local added_b = 0
local hdr = {fmt(prev), fmt(head)}
local rows = {}
for _, i in ipairs(fresh) do
  local key = ARGV[i]
  local sq = fmt(seen[key])
  local row = '{"seq":' .. sq .. ',"body":' .. ARGV[i + 1] .. '}'
  redis.call('XADD', log, sq .. '-0', 'r', row, 'k', key)
  redis.call('HSET', dedup, key, sq)
  added_b = added_b + #row
  hdr[#hdr + 1] = sq .. ':' .. #row
  rows[#rows + 1] = row
end
bytes = bytes + added_b

local function drop(entries)
  local last = nil
  for _, e in ipairs(entries) do
    local s = id_seq(e[1])
    local f = e[2]
    local row, key = f[2], f[4]
    if redis.call('HGET', dedup, key) == fmt(s) then redis.call('HDEL', dedup, key) end
    drop_n = drop_n + 1
    drop_b = drop_b + #row
    bytes = bytes - #row
    last = s
  end
  if last then
    if last > dropped then dropped = last end
    redis.call('XTRIM', log, 'MINID', fmt(last) .. '-1')
  end
end
if max_n > 0 then
  local excess = redis.call('XLEN', log) - max_n
  if excess > 0 then
    drop(redis.call('XRANGE', log, '-', '+', 'COUNT', math.min(excess, CAP)))
  end
end
if ret_us > 0 then
  drop(redis.call('XRANGE', log, '-', fmt(now - ret_us - 1) .. '-0', 'COUNT', CAP))
end
redis.call('HSET', meta, 'h', fmt(head), 'd', fmt(dropped), 'n', redis.call('XLEN', log),
  'b', bytes)
if expire_ms > 0 then
  -- Every row is older than the retention by then: an idle workspace forgets them
  -- without anyone appending. meta keeps head and the dropped horizon.
  redis.call('PEXPIRE', log, expire_ms)
  redis.call('PEXPIRE', dedup, expire_ms)
end

local msg = table.concat(hdr, ' ') .. '\n'
if added_b <= inline then
  msg = msg .. table.concat(rows)
else
  msg = fmt(prev) .. ' ' .. fmt(head) .. '\n'
end
redis.call('PUBLISH', ARGV[3], msg)
return {prev, created, #fresh, added_b, drop_n, drop_b, out}
"""
)

READ_LUA = (
    _LUA_COMMON
    + r"""
-- KEYS: log, meta.  ARGV: first id to return ('' = none), limit, max_bytes
local m = redis.call('HMGET', KEYS[2], 'h', 'd')
local head = tonumber(m[1]) or 0
local dropped = tonumber(m[2]) or 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  if head > dropped then dropped = head end
  return {head, 0, dropped, 0, {}}
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local oldest = 0
if #first > 0 then oldest = id_seq(first[1][1]) end
local rows, more = {}, 0
local start = ARGV[1]
if start ~= '' then
  local limit = tonumber(ARGV[2])
  local max_b = tonumber(ARGV[3])
  local total = 0
  while true do
    local want = math.min(limit - #rows, 512) + 1
    local got = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', want)
    local stop = false
    for _, e in ipairs(got) do
      local row = e[2][2]
      if #rows >= limit or (#rows > 0 and total + #row > max_b) then
        more = 1
        stop = true
        break
      end
      rows[#rows + 1] = row
      total = total + #row
      start = fmt(id_seq(e[1]) + 1) .. '-0'
    end
    if stop or #got < want then break end
  end
end
return {head, oldest, dropped, more, rows}
"""
)

KEYRING_LUA = r"""
-- KEYS: keyring.  ARGV: max, blob
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
"""

DEVICE_PUT_LUA = r"""
-- KEYS: entries (hash), times (zset).  ARGV: device, data, ttl_secs, max_devices
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('(%.6f', now - ttl))
  for _, d in ipairs(old) do
    redis.call('HDEL', KEYS[1], d)
    redis.call('ZREM', KEYS[2], d)
  end
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.6f', now), ARGV[1])
return 1
"""

DEVICE_MAP_LUA = r"""
-- KEYS: entries (hash), times (zset).  ARGV: ttl_secs.  Read-only.
local all = redis.call('HGETALL', KEYS[1])
local ttl = tonumber(ARGV[1])
if ttl <= 0 then return all end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #all, 2 do
  local at = redis.call('ZSCORE', KEYS[2], all[i])
  if (not at) or now - tonumber(at) <= ttl then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
"""

PAIR_CREATE_LUA = r"""
-- KEYS: code key, index.  ARGV: payload, ttl_ms, max_pairings, code
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 0 end
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[4])
return 1
"""

SCRIPTS = {
    "append": APPEND_LUA,
    "read": READ_LUA,
    "keyring": KEYRING_LUA,
    "device_put": DEVICE_PUT_LUA,
    "device_map": DEVICE_MAP_LUA,
    "pair_create": PAIR_CREATE_LUA,
}
SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}  # noqa: S324

# Errors Redis answers while it cannot serve (yet): all mean "try again".
_TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Redis trouble → StoreError: 503 with Retry-After, never a 500."""
    try:
        yield
    except StoreError:
        raise
    except rx.OutOfMemoryError:
        raise StoreBusy(
            "relay_full",
            "the relay's store is full (Redis maxmemory); try again later",
            retry_after=BUSY_RETRY_AFTER,
        ) from None
    except rx.ResponseError as exc:
        text = str(exc)
        if text.startswith("OOM"):
            raise StoreBusy(
                "relay_full",
                "the relay's store is full (Redis maxmemory); try again later",
                retry_after=BUSY_RETRY_AFTER,
            ) from None
        if not text.startswith(_TRANSIENT):
            LOG.error("Redis answered an unexpected error: %s", text)
        raise StoreUnavailable(retry_after=2) from None
    except (TimeoutError, rx.RedisError, OSError) as exc:
        LOG.debug("Redis unavailable: %r", exc)
        raise StoreUnavailable() from None


def _ws_keys(ws: str) -> tuple[str, str, str]:
    tag = f"relay:{{{ws}}}:"
    return tag + "log", tag + "dedup", tag + "meta"


def _channel(ws: str) -> bytes:
    return _CHAN_PREFIX + ws.encode() + _CHAN_SUFFIX


def _channel_ws(channel: bytes) -> str | None:
    if channel.startswith(_CHAN_PREFIX) and channel.endswith(_CHAN_SUFFIX):
        return channel[len(_CHAN_PREFIX) : -len(_CHAN_SUFFIX)].decode()
    return None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogatepass")


def _raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


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


_SUB, _UNSUB = 1, 2


class RedisStore:
    def __init__(self, url: str, bounds: Bounds | None = None) -> None:
        self.url = url
        self.bounds = bounds or Bounds()
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            # One retry, on connection errors only: a pooled connection that died
            # with a restarted Redis is replaced once. Timeouts are not retried
            # (a command that timed out may have run; the wait stays bounded).
            retry=Retry(NoBackoff(), 1, supported_errors=(rx.ConnectionError,)),
        )
        self._redis: Any = Redis(connection_pool=self._pool)
        self._epoch = ""
        self._listener: AppendListener | None = None
        self._watches: dict[str, _Watch] = {}
        # Pub/sub connection state, owned by _pubsub_forever.
        self._chan: dict[str, list[int]] = {}  # ws -> [last command, acks pending]
        self._ps_wake = asyncio.Event()
        self._ps_up = False
        self._ps_last_rx = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._closed = False
        # Approximate relay-wide counters: local deltas flushed to relay:stats.
        self._d_ws = 0
        self._d_env = 0
        self._d_bytes = 0
        self._stats_cache = Stats(0, 0, 0, 0)
        self._stats_lock = asyncio.Lock()
        ttl_ms = int(self.bounds.retention_secs * 1000)
        self._expire_ms = ttl_ms + 1000 if ttl_ms else 0
        self._retention_us = int(self.bounds.retention_secs * 1_000_000)

    # ------------------------------------------------------------------ basics
    @property
    def epoch(self) -> str:
        return self._epoch or "unknown"

    def set_listener(self, listener: AppendListener | None) -> None:
        self._listener = listener

    def _where(self) -> str:
        kw = self._pool.connection_kwargs
        if "path" in kw:
            return str(kw["path"])
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"

    async def start(self) -> None:
        self._closed = False
        self._background = [
            asyncio.create_task(self._pubsub_forever(), name="redis-pubsub"),
            asyncio.create_task(self._maintain_forever(), name="redis-maintenance"),
        ]
        try:
            async with asyncio.timeout(START_TIMEOUT):
                with _errors():
                    for src in SCRIPTS.values():
                        await self._redis.script_load(src)
                    await self._check_epoch()
                    await self._check_config()
        except (StoreError, TimeoutError):
            LOG.warning(
                "Redis at %s is not reachable; the relay answers 503 until it is", self._where()
            )
            return
        LOG.info("Redis store at %s, epoch %s", self._where(), self._epoch)

    async def _check_config(self) -> None:
        """Warn about Redis settings that can lose acknowledged envelopes."""
        try:
            policy = await self._redis.config_get("maxmemory-policy")
            persistence = await self._redis.info("persistence")
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
        LOG.info(
            "the relay-wide byte budget is Redis maxmemory with the Redis store "
            "(HIVE_RELAY_MAX_BYTES applies to the memory store only)"
        )

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._background, *self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background = []
        self._tasks.clear()
        for w in self._watches.values():
            w.ready.set()
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._flush_stats()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        with contextlib.suppress(Exception):
            await self._pool.disconnect()

    async def ping(self) -> bool:
        try:
            with _errors():
                return bool(await self._redis.ping())
        except StoreError:
            return False

    # ------------------------------------------------------------------- epoch
    def _adopt_epoch(self, value: bytes | str) -> None:
        epoch = value.decode() if isinstance(value, bytes) else value
        if epoch != self._epoch:
            if self._epoch:
                LOG.warning(
                    "the store's epoch changed from %s to %s: Redis lost its data "
                    "(flushed or replaced); clients re-sync",
                    self._epoch,
                    epoch,
                )
            self._epoch = epoch

    async def _check_epoch(self, current: bytes | None = None, known: bool = False) -> None:
        if not known:
            current = await self._redis.get(EPOCH_KEY)
        if current is None:
            # No epoch: a new Redis, or one that lost its dataset. SET NX makes every
            # instance that notices adopt the same new epoch.
            await self._redis.set(EPOCH_KEY, new_epoch(), nx=True)
            current = await self._redis.get(EPOCH_KEY)
            if current is None:
                raise StoreUnavailable()
        self._adopt_epoch(current)

    # --------------------------------------------------------------- scripting
    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._redis.evalsha(SHAS[name], len(keys), *keys, *args)
        except rx.NoScriptError:
            await self._redis.script_load(SCRIPTS[name])
            return await self._redis.evalsha(SHAS[name], len(keys), *keys, *args)

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
        args: list[Any] = [
            self.bounds.max_envelopes,
            self._retention_us,
            _channel(ws),
            INLINE_BYTES,
            self._expire_ms,
        ]
        for key, body in zip(keys, bodies, strict=True):
            args.append(key)
            args.append(body)
        with _errors():
            reply = await self._script("append", list(_ws_keys(ws)), args)
        prev, created, added, added_b, drop_n, drop_b, flat = reply
        results = [(int(flat[i]), bool(flat[i + 1])) for i in range(0, len(flat), 2)]
        if added:
            self._d_ws += int(created)
            self._d_env += int(added) - int(drop_n)
            self._d_bytes += int(added_b) - int(drop_b)
            w = self._watches.get(ws)
            if w is not None and w.cursor is not None:
                rows = [
                    (seq, encode_row(seq, body))
                    for (seq, dup), body in zip(results, bodies, strict=True)
                    if not dup
                ]
                self._apply(w, int(prev), rows[-1][0], rows)
        return results

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        w = self._watches.get(ws)
        if w is not None and not w.ready.is_set():
            await self._wait_ready(w)
        return await self._read(ws, after, limit, max_bytes, with_epoch=True)

    async def _read(
        self, ws: str, after: int, limit: int, max_bytes: int, with_epoch: bool
    ) -> Page:
        log, _, meta = _ws_keys(ws)
        start = f"{after + 1}-0" if 0 <= after < MAX_U64 else ""
        args = [log, meta, start, max(1, min(limit, 1 << 40)), max(1, max_bytes)]
        with _errors():
            for attempt in (0, 1):
                try:
                    if not with_epoch:
                        res = await self._redis.evalsha(SHAS["read"], 2, *args)
                        break
                    async with self._redis.pipeline(transaction=False) as pipe:
                        pipe.evalsha(SHAS["read"], 2, *args)
                        pipe.get(EPOCH_KEY)
                        res, epoch = await pipe.execute()
                    await self._check_epoch(epoch, known=True)
                    break
                except rx.NoScriptError:
                    if attempt:
                        raise
                    await self._redis.script_load(READ_LUA)
        head, oldest, dropped, more, rows = res
        return Page(list(rows), int(head), int(oldest), int(dropped), bool(more))

    # ------------------------------------------------------------ live delivery
    def watch(self, ws: str) -> None:
        """The hub's first local subscriber of `ws` arrived: follow its appends."""
        if ws in self._watches:
            return
        self._watches[ws] = _Watch(ws)
        self._ps_wake.set()

    def unwatch(self, ws: str) -> None:
        w = self._watches.pop(ws, None)
        if w is not None:
            w.ready.set()
            self._ps_wake.set()

    async def _wait_ready(self, w: _Watch) -> None:
        try:
            await asyncio.wait_for(w.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            raise StoreUnavailable("live delivery from the store is not ready") from None

    def _spawn(self, coro: Any) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self, ws: str, rows: list[tuple[int, bytes]]) -> None:
        if self._listener is None:
            return
        try:
            self._listener(ws, rows)
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
                page = await self._read(w.ws, w.cursor, FETCH_ROWS, FETCH_BYTES, False)
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
        if failed and self._ps_up and not self._closed:
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
            with _errors():
                head = await self._redis.hget(_ws_keys(w.ws)[2], "h")
        except StoreError:
            w.establishing = False
            # The pub/sub writer retries it on its next pass.
            asyncio.get_running_loop().call_later(FETCH_RETRY, self._ps_wake.set)
            return
        w.establishing = False
        if self._watches.get(w.ws) is not w:
            return
        w.cursor = int(head or 0)
        w.ready.set()
        # Notifications that arrived before the cursor was known were dropped.
        self._fetch_soon(w)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        ws = _channel_ws(channel)
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

    def _on_ack(self, kind: bytes, channel: bytes) -> None:
        if channel == CONTROL_CHANNEL:
            return
        ws = _channel_ws(channel)
        st = self._chan.get(ws) if ws is not None else None
        if ws is None or st is None:
            return
        st[1] -= 1
        if st[1] > 0:
            return
        if st[0] == _UNSUB:
            del self._chan[ws]
            return
        w = self._watches.get(ws)
        if w is None:
            self._ps_wake.set()  # no longer wanted: the writer unsubscribes
        elif w.cursor is None:
            self._establish_soon(w)
        else:
            self._fetch_soon(w)  # re-subscribed after a reconnect: catch up

    def _new_pubsub_connection(self) -> Any:
        kwargs = {
            k: v
            for k, v in self._pool.connection_kwargs.items()
            if not k.startswith(("maint_notifications", "oss_cluster_maint"))
        }
        kwargs.update(
            socket_timeout=None,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        return self._pool.connection_class(**kwargs)

    async def _pubsub_forever(self) -> None:
        delay = RECONNECT_MIN
        down_logged = False
        while not self._closed:
            conn: Any = None
            try:
                conn = self._new_pubsub_connection()
                await conn.connect()
                self._chan = {}
                self._ps_last_rx = asyncio.get_running_loop().time()
                await conn.send_command("SUBSCRIBE", CONTROL_CHANNEL, check_health=False)
                self._ps_up = True
                if down_logged:
                    LOG.info("Redis pub/sub reconnected; catching up watched workspaces")
                    down_logged = False
                delay = RECONNECT_MIN
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pubsub_reader(conn))
                    tg.create_task(self._pubsub_writer(conn))
            except* Exception as group:
                first = group.exceptions[0]
                if not isinstance(first, rx.RedisError | OSError | TimeoutError):
                    LOG.error("Redis pub/sub listener failed; restarting it", exc_info=first)
                elif not down_logged:
                    LOG.warning("Redis pub/sub connection lost: %s", first)
                    down_logged = True
            finally:
                self._ps_up = False
                self._chan = {}
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _pubsub_reader(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await conn.read_response(timeout=math.inf)
            self._ps_last_rx = loop.time()
            if not isinstance(msg, list) or not msg:
                continue
            kind = msg[0]
            if kind == b"message":
                self._on_message(msg[1], msg[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                self._on_ack(kind, msg[1])

    async def _pubsub_writer(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        last_ping = loop.time()
        while True:
            self._ps_wake.clear()
            await self._pubsub_sync(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ps_wake.wait(), PING_EVERY)
            now = loop.time()
            if now - self._ps_last_rx > SILENT_LIMIT:
                raise rx.ConnectionError("the Redis pub/sub connection went silent")
            if now - last_ping >= PING_EVERY:
                await conn.send_command("PING", check_health=False)
                last_ping = now

    async def _pubsub_sync(self, conn: Any) -> None:
        """Subscribe what is watched, unsubscribe what is not, establish new watches."""
        subs: list[str] = []
        for ws, w in self._watches.items():
            st = self._chan.get(ws)
            if st is None or st[0] == _UNSUB:
                subs.append(ws)
            elif st[1] == 0 and w.cursor is None:
                self._establish_soon(w)  # already subscribed and confirmed
        unsubs = [ws for ws, st in self._chan.items() if st[0] == _SUB and ws not in self._watches]
        for ws in subs:
            st = self._chan.setdefault(ws, [_SUB, 0])
            st[0] = _SUB
            st[1] += 1
        for ws in unsubs:
            st = self._chan[ws]
            st[0] = _UNSUB
            st[1] += 1
        for i in range(0, len(subs), 500):
            chans = [_channel(ws) for ws in subs[i : i + 500]]
            await conn.send_command("SUBSCRIBE", *chans, check_health=False)
        for i in range(0, len(unsubs), 500):
            chans = [_channel(ws) for ws in unsubs[i : i + 500]]
            await conn.send_command("UNSUBSCRIBE", *chans, check_health=False)

    # ------------------------------------------------------------ side channels
    def _check_side(self, size: int) -> None:
        if size > self.bounds.max_side_bytes:
            raise StoreFull(
                "too_large",
                f"the entry is {size} bytes; the limit is {self.bounds.max_side_bytes}",
            )

    async def keyring_append(self, ws: str, blob: bytes) -> None:
        self._check_side(len(blob))
        with _errors():
            ok = await self._script(
                "keyring", [f"relay:{{{ws}}}:keyring"], [self.bounds.max_keyring, blob]
            )
        if not ok:
            raise StoreFull(
                "keyring_full",
                f"the workspace keyring holds its limit of {self.bounds.max_keyring} blobs",
            )

    async def keyring_list(self, ws: str) -> list[bytes]:
        with _errors():
            return list(await self._redis.lrange(f"relay:{{{ws}}}:keyring", 0, -1))

    @staticmethod
    def _device_keys(channel: str, ws: str) -> list[str]:
        if channel not in DEVICE_CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {DEVICE_CHANNELS}")
        key = f"relay:{{{ws}}}:{channel}"
        return [key, key + ":t"]

    async def device_put(self, channel: str, ws: str, device_id: str, data: bytes) -> None:
        self._check_side(len(data))
        keys = self._device_keys(channel, ws)
        args = [_raw(device_id), data, self.bounds.presence_ttl, self.bounds.max_devices]
        with _errors():
            ok = await self._script("device_put", keys, args)
        if not ok:
            raise StoreFull(
                "too_many_devices",
                f"the workspace {channel} holds its limit of {self.bounds.max_devices} devices",
            )

    async def device_map(self, channel: str, ws: str) -> list[tuple[str, bytes]]:
        keys = self._device_keys(channel, ws)
        with _errors():
            flat = await self._script("device_map", keys, [self.bounds.presence_ttl])
        return [(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]

    # ----------------------------------------------------------------- pairing
    async def pair_create(self, payload: str, ttl: int) -> str:
        for _ in range(20):
            code = new_pair_code()
            keys = [f"relay:{{pair}}:c:{code}", PAIR_INDEX]
            args = [_raw(payload), int(ttl * 1000), self.bounds.max_pairings, code]
            with _errors():
                res = await self._script("pair_create", keys, args)
            if res == 1:
                return code
            if res == -1:
                raise StoreBusy(
                    "too_many_pairings", "the relay holds too many pairing codes; try again later"
                )
        raise StoreBusy("too_many_pairings", "no free pairing code; try again later")

    async def pair_resolve(self, code: str) -> str | None:
        with _errors():
            value = await self._redis.get(f"relay:{{pair}}:c:{code}")
        return None if value is None else _text(value)

    # ------------------------------------------------------------------ stats
    async def _flush_stats(self) -> None:
        d_ws, d_env, d_bytes = self._d_ws, self._d_env, self._d_bytes
        if not (d_ws or d_env or d_bytes):
            return
        self._d_ws = self._d_env = self._d_bytes = 0
        try:
            with _errors():
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hincrby(STATS_KEY, "workspaces", d_ws)
                    pipe.hincrby(STATS_KEY, "envelopes", d_env)
                    pipe.hincrby(STATS_KEY, "bytes", d_bytes)
                    await pipe.execute()
        except StoreError:
            self._d_ws += d_ws
            self._d_env += d_env
            self._d_bytes += d_bytes
            raise

    async def _load_stats(self) -> Stats:
        with _errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(STATS_KEY)
                pipe.zcount(PAIR_INDEX, int(time.time() * 1000), "+inf")
                raw, pairs = await pipe.execute()

        def get(name: bytes) -> int:
            return int(raw.get(name, 0))

        self._stats_cache = Stats(
            workspaces=get(b"workspaces"),
            envelopes=get(b"envelopes"),
            stored_bytes=get(b"bytes"),
            pairings=int(pairs),
        )
        return self._stats_cache

    def stats_now(self) -> Stats:
        """Cheap and approximate: the last relay-wide counters plus local changes since."""
        c = self._stats_cache
        return Stats(
            workspaces=max(0, c.workspaces + self._d_ws),
            envelopes=max(0, c.envelopes + self._d_env),
            stored_bytes=max(0, c.stored_bytes + self._d_bytes),
            pairings=c.pairings,
        )

    async def stats(self) -> Stats:
        with contextlib.suppress(StoreError):
            async with self._stats_lock:
                await self._flush_stats()
                await self._load_stats()
        return self.stats_now()

    async def _maintain_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(MAINT_EVERY)
            try:
                with _errors():
                    await self._check_epoch()
                async with self._stats_lock:
                    await self._flush_stats()
                    await self._load_stats()
            except StoreError:
                pass
