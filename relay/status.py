"""The status page's recent history: fixed-size ring buffers of relay-wide figures.

One periodic task (`Sampler.run`) reads every registered series once per
interval and appends the values, with one shared timestamp, to rings that hold
the last 15 minutes. A series is a name and a `read()` returning the current
value; `rate()` and `window_quantile()` turn counters and histogram buckets
into per-second rates and per-interval quantiles. A value of None is a gap (no
publish in the interval, Redis not answering). Nothing here knows a workspace:
series are registered from relay-wide counters only.

Readers (the samples stream) never get a queue of their own: they remember the
number of the last sample they sent and wait for the next one, so a slow or
stalled reader costs the relay nothing but its socket.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from relay.metrics import _Histogram

LOG = logging.getLogger("relay.status")
WINDOW_SECS = 15 * 60.0
PROBE_TIMEOUT = 2.0  # an async probe (Redis PING) that takes longer is a gap

Read = Callable[[], float | None]
T = TypeVar("T")


class Ring(Generic[T]):
    """The last `capacity` values, oldest first; memory fixed at creation."""

    __slots__ = ("_items",)

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a ring holds at least one value")
        self._items: deque[T] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._items.maxlen or 0

    def append(self, value: T) -> None:
        self._items.append(value)

    def values(self) -> list[T]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Series:
    name: str
    read: Read
    label: str
    unit: str  # "/s", "bytes", "s", "" (a count)
    limit: Callable[[], float | None] | None = None  # drawn as a line (the memory budget)
    ring: Ring[float | None] = field(default_factory=lambda: Ring(1))

    def describe(self) -> dict[str, Any]:
        limit = self.limit() if self.limit is not None else None
        return {"name": self.name, "label": self.label, "unit": self.unit, "limit": limit}


def _clean(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


class Sampler:
    """Registered series, their rings, and the task that fills them."""

    def __init__(self, interval: float, window: float = WINDOW_SECS) -> None:
        if interval <= 0:
            raise ValueError("the sample interval must be positive")
        self.interval = interval
        self.capacity = max(2, math.ceil(window / interval))
        self.times: Ring[float] = Ring(self.capacity)
        self.series: dict[str, Series] = {}
        self.count = 0  # samples taken since start; the newest is number count - 1
        self.closed = False
        self._probes: list[Callable[[], Awaitable[None]]] = []
        self._new = asyncio.Event()

    def register_series(
        self,
        name: str,
        read: Read,
        *,
        label: str,
        unit: str = "",
        limit: Callable[[], float | None] | None = None,
    ) -> Series:
        if name in self.series:
            raise ValueError(f"series {name!r} is registered already")
        series = Series(name, read, label, unit, limit, Ring(self.capacity))
        # A series registered late starts with gaps, so every ring lines up with `times`.
        for _ in range(len(self.times)):
            series.ring.append(None)
        self.series[name] = series
        return series

    def add_probe(self, probe: Callable[[], Awaitable[None]]) -> None:
        """An async measurement run (bounded by PROBE_TIMEOUT) before each sample."""
        self._probes.append(probe)

    def sample(self, now: float | None = None) -> dict[str, float | None]:
        """Read every series once and append the values; returns them."""
        values: dict[str, float | None] = {}
        for name, series in self.series.items():
            try:
                value = _clean(series.read())
            except Exception:  # a broken series is a gap, never a dead sampler
                LOG.exception("status series %s failed to read", name)
                value = None
            series.ring.append(value)
            values[name] = value
        self.times.append(time.time() if now is None else now)
        self.count += 1
        event, self._new = self._new, asyncio.Event()
        event.set()
        return values

    async def _probe(self) -> None:
        for probe in self._probes:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await probe()
            except Exception as exc:  # the probe records its own gap
                LOG.debug("status probe failed: %r", exc)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.closed:
            next_at += self.interval
            await self._probe()
            self.sample()
            # A late sample (a busy loop) does not make the next ones bunch up.
            next_at = max(next_at, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def close(self) -> None:
        """Shutdown: waiting readers wake up and end."""
        self.closed = True
        self._new.set()

    async def wait_after(self, number: int, timeout: float) -> bool:
        """Wait until a sample past `number` exists; False on timeout or close."""
        try:
            async with asyncio.timeout(timeout):
                while self.count <= number and not self.closed:
                    await self._new.wait()
        except TimeoutError:
            return False
        return self.count > number and not self.closed

    # ------------------------------------------------------------ wire shapes
    def snapshot(self) -> dict[str, Any]:
        """Everything the rings hold: what a samples stream sends first."""
        return {
            "interval": self.interval,
            "capacity": self.capacity,
            "count": self.count,
            "series": [s.describe() for s in self.series.values()],
            "t": self.times.values(),
            "values": {name: s.ring.values() for name, s in self.series.items()},
        }

    def newest(self) -> dict[str, Any]:
        """The newest sample alone (count must be at least 1)."""
        return {
            "count": self.count,
            "t": self.times.values()[-1],
            "values": {name: s.ring.values()[-1] for name, s in self.series.items()},
        }


# ------------------------------------------------------------- series kinds
def rate(read_total: Callable[[], float], clock: Callable[[], float] = time.monotonic) -> Read:
    """A counter as a per-second rate over the time since the previous read."""
    last = [read_total(), clock()]

    def read() -> float | None:
        total, now = read_total(), clock()
        elapsed = now - last[1]
        delta = total - last[0]
        last[0], last[1] = total, now
        if elapsed <= 0:
            return None
        return max(0.0, delta) / elapsed

    return read


def window_quantile(
    read_counts: Callable[[], Sequence[int]], bounds: Sequence[float], q: float
) -> Read:
    """The q-quantile of what a histogram observed since the previous read.

    `read_counts()` gives per-bucket counts (not cumulative) for `bounds` plus
    one overflow bucket, as the relay's histograms keep them. The quantile is
    interpolated inside its bucket, as Prometheus' histogram_quantile does, so
    the status page and a dashboard agree; its resolution is the buckets'. An
    interval with no observations is a gap (None).
    """
    last = list(read_counts())

    def read() -> float | None:
        counts = list(read_counts())
        delta = [max(0, c - p) for c, p in zip(counts, last, strict=True)]
        last[:] = counts
        return quantile_of_buckets(delta, bounds, q)

    return read


def quantile_of_buckets(counts: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            if i >= len(bounds):  # the overflow bucket: the highest finite bound
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])  # pragma: no cover - rank <= total always lands above


class RoundTrip:
    """The latest measured round trip of an async call (a Redis PING): a probe
    that times it, and a series read that hands the value out once."""

    def __init__(self, call: Callable[[], Awaitable[Any]]) -> None:
        self._call = call
        self.value: float | None = None
        # Every probe's outcome, for /metrics (hive_relay_redis_ping_seconds).
        self.seconds = _Histogram()
        self.failures = 0

    async def probe(self) -> None:
        self.value = None  # failed or timed out: a gap
        started = time.perf_counter()
        try:
            await self._call()
        except BaseException:  # an error, or the sampler's timeout cancelling it
            self.failures += 1
            raise
        self.value = time.perf_counter() - started
        self.seconds.observe(self.value)

    def collect(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "hive_relay_redis_ping_seconds",
            "Round trip of the status sampler's PING on the store's own connection pool",
        )
        hist.add_metric([], self.seconds.buckets(), self.seconds.total)
        yield hist
        yield CounterMetricFamily(
            "hive_relay_redis_ping_failures",
            "Status-sampler PINGs that failed or took longer than 2 s",
            value=self.failures,
        )

    def read(self) -> float | None:
        value, self.value = self.value, None
        return value
