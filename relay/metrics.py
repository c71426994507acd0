"""Prometheus metrics. Content-blind: labels are route templates, methods and
status codes only; never workspace ids, tokens or client addresses."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _Gauges(Collector):
    def __init__(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, value) in self._read().items():
            yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "hive_relay_http_requests",
            "HTTP requests and WebSocket sessions by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "hive_relay_http_request_duration_seconds",
            "Time to the end of the response, by route template (live streams excluded)",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )
        self.appended = Counter(
            "hive_relay_envelopes_appended", "Envelopes appended", registry=self.registry
        )
        self.duplicates = Counter(
            "hive_relay_envelopes_duplicate",
            "Pushes answered as duplicates (nothing appended)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "hive_relay_rejected",
            "Requests refused to protect the relay, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.slow_consumers = Counter(
            "hive_relay_slow_consumers_disconnected",
            "Live subscribers disconnected because they fell too far behind",
            registry=self.registry,
        )
        self.started = time.time()
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def observe(self, route: str, method: str, status: int, seconds: float, timed: bool) -> None:
        """Count a request and time it (live streams and long-polls are not timed).

        Label children are cached: looking them up costs more than the update.
        """
        key = (route, method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(route, method, str(status))
        child.inc()
        if timed:
            hist = self._durations.get(route)
            if hist is None:
                hist = self._durations[route] = self.duration.labels(route)
            hist.observe(seconds)

    def add_gauges(self, read: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self.registry.register(_Gauges(read))
