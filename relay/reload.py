"""Reload without a restart: watched files, read again on SIGHUP or when they change.

A `Reloader` holds a registry of watched items. Each item is a name (the
metric label and the word in log lines), the paths it is read from, a `load`
callback that reads them into a new immutable value (or raises with a reason)
and an `apply` callback that installs that value and returns a short summary
for the log. `load` runs in a worker thread (file reads stay off the event
loop); `apply` runs on the loop, so a request sees either the old value or
the new one, never a mix.

A change is noticed by a stat poll: (mtime, size, inode, device) of each path
every `interval` seconds, `HIVE_RELAY_RELOAD_INTERVAL` (docs/operations.md
gives its measured cost). A path that changed is stat'ed again after a short
settle delay and loaded only once it holds still, so a file being written is
not read half-way. `SIGHUP` reloads every item at once.

A failed load changes nothing: the previous value stays in force, one log line
names the item, the file and the reason, and `/metrics` counts it
(`hive_relay_reload_total{item,result="failed"}`, `hive_relay_reload_failing`).
The same unchanged file is not retried (or logged) again until it changes or
a SIGHUP asks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relay.settings import SettingsError

LOG = logging.getLogger("relay.reload")
SETTLE = 0.25  # seconds a changed file must hold still before it is read

Signature = tuple[tuple[int, int, int, int] | None, ...]


class ReloadError(Exception):
    """A load that cannot be used; the message is the reason the log line gives."""


def signature(paths: Sequence[str]) -> Signature:
    """What the poll compares: (mtime ns, size, inode, device) of each path, None if absent.

    `os.stat` follows symbolic links, so a link switched to a new target (certbot's
    live/ directory, a Kubernetes secret volume) counts as a change.
    """
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(out)


@dataclass(eq=False)
class Watched:
    name: str
    paths: tuple[str, ...]
    load: Callable[[], Any]
    apply: Callable[[Any], str]
    seen: Signature = ()  # the paths' signature when last read (successfully or not)
    ok: int = 0
    failed: int = 0
    failing: bool = False
    last_success: float = field(default_factory=time.time)  # the start-up load counts


class Reloader:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.items: dict[str, Watched] = {}
        self._requested = False
        self._wake: anyio.Event | None = None

    def watch(
        self,
        name: str,
        paths: Sequence[str],
        load: Callable[[], Any],
        apply: Callable[[Any], str],
    ) -> None:
        """Register an item. Call it right after the start-up read of `paths`: a
        change made since that read is picked up by the first poll (the signature
        is taken now)."""
        assert name not in self.items, name
        self.items[name] = Watched(name, tuple(paths), load, apply, signature(paths))

    # --------------------------------------------------------------- triggers
    def request(self) -> None:
        """Reload every item soon. Safe from a signal handler on the loop's thread."""
        self._requested = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Poll and serve SIGHUP requests until cancelled."""
        while True:
            self._wake = anyio.Event()
            if not self._requested:
                with anyio.move_on_after(self.interval if self.interval > 0 else float("inf")):
                    await self._wake.wait()
            if self._requested:
                self._requested = False
                await self.reload(None, "SIGHUP")
            elif self.interval > 0:
                await self.poll()

    async def poll(self) -> list[str]:
        """Reload the items whose files changed and have held still; their names."""
        changed = {}
        for item in self.items.values():
            now = signature(item.paths)
            if now != item.seen:
                changed[item.name] = (item, now)
        if not changed:
            return []
        await self.settle()
        # Still changing (being written): the next poll looks again.
        steady = [name for name, (item, then) in changed.items() if signature(item.paths) == then]
        if steady:
            await self.reload(steady, "file change")
        return steady

    async def settle(self) -> None:
        """The pause between noticing a change and checking that the file holds still."""
        await anyio.sleep(SETTLE)

    # ---------------------------------------------------------------- reload
    async def reload(self, names: Sequence[str] | None, cause: str) -> dict[str, bool]:
        """Load and apply the named items (every one when None); name → success."""
        results: dict[str, bool] = {}
        if not self.items:
            LOG.info("%s: nothing to reload (no access file is in use)", cause)
        for item in list(self.items.values()):
            if names is not None and item.name not in names:
                continue
            results[item.name] = await self._reload_one(item, cause)
        return results

    async def _reload_one(self, item: Watched, cause: str) -> bool:
        before = signature(item.paths)
        item.seen = before  # this version is not read again until it changes
        try:
            value = await anyio.to_thread.run_sync(item.load)
        except Exception as exc:  # any reason a load fails leaves the old value in force
            return self._failed(item, cause, _reason(exc))
        try:
            summary = item.apply(value)
        except Exception:  # a relay bug: logged with its traceback; the reloader lives on
            LOG.exception("reload of %s (%s): applying it failed", item.name, cause)
            return self._failed(item, cause, "the relay could not apply it (see above)")
        item.ok += 1
        item.failing = False
        item.last_success = time.time()
        LOG.info("reloaded %s (%s): %s", item.name, cause, summary)
        return True

    def _failed(self, item: Watched, cause: str, reason: str) -> bool:
        item.failed += 1
        item.failing = True
        LOG.error(
            "reload of %s failed (%s), keeping the previous one: %s", item.name, cause, reason
        )
        return False

    # --------------------------------------------------------------- metrics
    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "hive_relay_reload",
            "Reloads of watched files (SIGHUP or a change), by item and result",
            labels=["item", "result"],
        )
        failing = GaugeMetricFamily(
            "hive_relay_reload_failing",
            "1 while an item's file on disk is refused and its previous version is in force",
            labels=["item"],
        )
        last = GaugeMetricFamily(
            "hive_relay_reload_last_success_timestamp_seconds",
            "When an item was last loaded successfully (start-up counts), Unix seconds",
            labels=["item"],
        )
        for item in self.items.values():
            total.add_metric([item.name, "ok"], item.ok)
            total.add_metric([item.name, "failed"], item.failed)
            failing.add_metric([item.name], 1.0 if item.failing else 0.0)
            last.add_metric([item.name], item.last_success)
        yield total
        yield failing
        yield last


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename!r}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, (ReloadError, SettingsError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
