"""Prometheus metrics. Content-blind: labels are route templates, methods, status
codes and refusal reasons only; never workspace ids, tokens or client addresses.

The hot-path numbers are plain integers updated on the event loop (one thread,
no locks) and turned into Prometheus families by a collector at scrape time;
prometheus-client does the exposition. Its own Counter/Histogram take a lock
and a label lookup per update, which cost more than the rest of the accounting.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class Counter:
    """A lock-free counter for code that runs on the event loop."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Metrics(Collector):
    def __init__(self, publish_routes: frozenset[str] = frozenset()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.started = time.time()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        # Successful publishes alone (the routes' histograms mix in reads), for the
        # status page's publish latency; not exported (it would repeat the route's).
        self.publish_routes = publish_routes
        self.publish = _Histogram()
        self.appended = Counter()
        self.duplicates = Counter()
        self.slow_consumers = Counter()
        self.streams_ended_by_reload = Counter()
        self._rejected: dict[str, int] = {}
        self._unavailable: dict[str, int] = {}
        self._gauges: list[Callable[[], dict[str, tuple[str, float]]]] = []
        self._collectors: list[Callable[[], Iterator[Metric]]] = []
        self.registry.register(self)

    def observe(self, route: str, method: str, status: int, seconds: float, timed: bool) -> None:
        """Count a request and time it (live streams and long-polls are not timed)."""
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        if timed:
            hist = self._durations.get(key[:2])
            if hist is None:
                hist = self._durations[key[:2]] = _Histogram()
            hist.observe(seconds)
            if method == "POST" and status == 200 and route in self.publish_routes:
                self.publish.observe(seconds)

    def answered(self, read_route: str) -> tuple[int, int, int]:
        """Totals so far: GETs of `read_route` answered 200, 4xx answers, 5xx answers."""
        reads = client = server = 0
        for (route, method, status), n in self._requests.items():
            if status >= 500:
                server += n
            elif status >= 400:
                client += n
            elif status == 200 and method == "GET" and route == read_route:
                reads += n
        return reads, client, server

    def rejected(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def unavailable(self, reason: str) -> None:
        """Count a 503: the store failing or busy, or the live-stream cap reached."""
        self._unavailable[reason] = self._unavailable.get(reason, 0) + 1

    def add_gauges(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._gauges.append(read)

    def add_collector(self, read: Callable[[], Iterator[Metric]]) -> None:
        """Families another part builds itself (the journal's histograms)."""
        self._collectors.append(read)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "hive_relay_http_requests",
            "HTTP requests and WebSocket sessions by route template, method and status",
            labels=["route", "method", "status"],
        )
        for (route, method, status), n in sorted(self._requests.items()):
            requests.add_metric([route, method, str(status)], n)
        yield requests
        duration = HistogramMetricFamily(
            "hive_relay_http_request_duration_seconds",
            "Time to the end of the response, by route template and method (live streams "
            "excluded), so that publishing and reading one route are told apart",
            labels=["route", "method"],
        )
        for (route, method), hist in sorted(self._durations.items()):
            duration.add_metric([route, method], hist.buckets(), hist.total)
        yield duration
        yield CounterMetricFamily(
            "hive_relay_envelopes_appended", "Envelopes appended", value=self.appended.value
        )
        yield CounterMetricFamily(
            "hive_relay_envelopes_duplicate",
            "Pushes answered as duplicates (nothing appended)",
            value=self.duplicates.value,
        )
        yield CounterMetricFamily(
            "hive_relay_slow_consumers_disconnected",
            "Live subscribers disconnected because they fell too far behind",
            value=self.slow_consumers.value,
        )
        yield CounterMetricFamily(
            "hive_relay_streams_ended_by_reload",
            "Live streams ended because a reload of the access files no longer accepts their token",
            value=self.streams_ended_by_reload.value,
        )
        rejected = CounterMetricFamily(
            "hive_relay_rejected",
            "Requests refused to protect the relay (429), by reason",
            labels=["reason"],
        )
        for reason, n in sorted(self._rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        unavailable = CounterMetricFamily(
            "hive_relay_unavailable",
            "Requests answered 503 (store unavailable or busy, stream caps reached), by reason",
            labels=["reason"],
        )
        for reason, n in sorted(self._unavailable.items()):
            unavailable.add_metric([reason], n)
        yield unavailable
        for read in self._gauges:
            for name, (doc, value) in read().items():
                yield GaugeMetricFamily(name, doc, value=value)
        for collect in self._collectors:
            yield from collect()
