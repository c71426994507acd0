"""Approximate relay-wide counters for the status page and the metrics gauges.

Each instance counts its own changes locally and flushes the deltas into the
`relay:stats` hash (HINCRBY) about once a second, then reads the totals back.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from relay.store.base import Stats, StoreError
from relay.store.redis.errors import redis_errors
from relay.store.redis.keys import PAIR_INDEX, STATS_KEY


class StatsCounter:
    def __init__(self) -> None:
        self._d_ws = 0
        self._d_env = 0
        self._d_bytes = 0
        self._cache = Stats(0, 0, 0, 0)
        self._lock = asyncio.Lock()

    def count(self, workspaces: int, envelopes: int, stored_bytes: int) -> None:
        self._d_ws += workspaces
        self._d_env += envelopes
        self._d_bytes += stored_bytes

    def now(self) -> Stats:
        """Cheap and approximate: the last relay-wide counters plus local changes since."""
        c = self._cache
        return Stats(
            workspaces=max(0, c.workspaces + self._d_ws),
            envelopes=max(0, c.envelopes + self._d_env),
            stored_bytes=max(0, c.stored_bytes + self._d_bytes),
            pairings=c.pairings,
        )

    async def flush(self, redis: Any) -> None:
        d_ws, d_env, d_bytes = self._d_ws, self._d_env, self._d_bytes
        if not (d_ws or d_env or d_bytes):
            return
        self._d_ws = self._d_env = self._d_bytes = 0
        try:
            with redis_errors():
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.hincrby(STATS_KEY, "workspaces", d_ws)
                    pipe.hincrby(STATS_KEY, "envelopes", d_env)
                    pipe.hincrby(STATS_KEY, "bytes", d_bytes)
                    await pipe.execute()
        except StoreError:
            self.count(d_ws, d_env, d_bytes)  # kept for the next flush
            raise

    async def _load(self, redis: Any) -> None:
        with redis_errors():
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(STATS_KEY)
                pipe.zcount(PAIR_INDEX, int(time.time() * 1000), "+inf")
                raw, pairs = await pipe.execute()

        def get(name: bytes) -> int:
            return int(raw.get(name, 0))

        self._cache = Stats(
            workspaces=get(b"workspaces"),
            envelopes=get(b"envelopes"),
            stored_bytes=get(b"bytes"),
            pairings=int(pairs),
        )

    async def refresh(self, redis: Any) -> None:
        """Flush the local deltas, then read the relay-wide totals; raises StoreError."""
        async with self._lock:
            await self.flush(redis)
            await self._load(redis)
