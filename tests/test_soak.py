"""Soak: publishers and subscribers on every transport, dropping and resuming at
random, against a real relay process for a while.

Per workspace, three publishers (single HTTP pushes with an occasional
same-key retry, HTTP batches, a WebSocket that reconnects between bursts) and
five subscribers (SSE with bodies resuming by Last-Event-ID, SSE with bodies
resuming by `after=`, SSE nudges plus cursor reads, a WebSocket, long-polls),
each of which hangs up at random moments and resumes from its cursor.

What must hold:

* every acknowledged envelope reaches every subscriber exactly once, in seq
  order, with the body that was acknowledged (no gap, no duplicate, no hole);
* a retried push with the same key is acknowledged with the original seq and
  delivered once;
* after the run every stream slot is released;
* the relay's RSS at the end is within a small margin of its RSS after warm-up
  (retention keeps the store at a fixed size, so growth would be a leak).

The run lasts HIVE_RELAY_SOAK_SECS seconds (default 40, about a minute with
start-up and drain); `make soak` runs it for longer. Random choices come from a
seeded generator (HIVE_RELAY_SOAK_SEED); the interleaving is the machine's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.relayproc import RelayProcess, assert_quiet_log

SOAK_SECS = float(os.environ.get("HIVE_RELAY_SOAK_SECS", "40"))
SEED = int(os.environ.get("HIVE_RELAY_SOAK_SEED", "20261123"))
WORKSPACES = ("soak-a", "soak-b", "soak-c")
CAP = 600  # envelopes retained per workspace: the store stops growing once full
WAIT = 60.0  # bound on the drain and on any single wait
# RSS may grow by this much after warm-up: allocator noise, not a leak.
RSS_MARGIN = float(os.environ.get("HIVE_RELAY_SOAK_RSS_MARGIN", "0.05"))
RSS_SLACK_KIB = 4 * 1024

pytestmark = pytest.mark.slow


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Ledger:
    """What the relay acknowledged in one workspace: seq → body id."""

    ws: str
    acked: dict[int, str] = field(default_factory=dict)
    duplicates: int = 0

    def ack(self, seq: int, body_id: str, duplicate: bool) -> None:
        if duplicate:
            assert self.acked.get(seq) == body_id, (self.ws, seq, body_id)
            self.duplicates += 1
        else:
            assert seq not in self.acked, f"{self.ws}: seq {seq} acknowledged twice"
            self.acked[seq] = body_id


@dataclass
class Seen:
    """What one subscriber received, in order."""

    name: str
    seqs: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    reconnects: int = 0

    @property
    def cursor(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def take(self, seq: int, body: Any) -> None:
        assert seq > self.cursor, f"{self.name}: seq {seq} after {self.cursor} (dup or reorder)"
        self.seqs.append(seq)
        self.ids.append(body["id"])


class Soak:
    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.base = relay.url
        self.ws_base = f"ws://127.0.0.1:{relay.port}"
        self.ledgers = {ws: Ledger(ws) for ws in WORKSPACES}
        self.seen: dict[str, list[Seen]] = {ws: [] for ws in WORKSPACES}
        self.stop_publishing = asyncio.Event()
        self.final: dict[str, int] = {}  # per workspace, the last seq, once publishing stopped
        self.rng = random.Random(SEED)

    def child_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    # ------------------------------------------------------------ publishers
    async def http_publisher(self, c: httpx.AsyncClient, ws: str, tag: str) -> None:
        rng = self.child_rng()
        ledger = self.ledgers[ws]
        n = 0
        while not self.stop_publishing.is_set():
            n += 1
            body_id = f"{tag}-{n}"
            body = {"id": body_id, "pad": "x" * rng.randrange(0, 400)}
            headers = {"Idempotency-Key": body_id}
            r = await c.post(f"/v1/workspaces/{ws}/envelopes", json=body, headers=headers)
            assert r.status_code == 200, r.text
            ledger.ack(r.json()["seq"], body_id, r.json().get("duplicate", False))
            if rng.random() < 0.05:  # a retry after a lost answer: same key, same seq
                again = await c.post(f"/v1/workspaces/{ws}/envelopes", json=body, headers=headers)
                assert again.json() == {"seq": r.json()["seq"], "duplicate": True}
                ledger.ack(again.json()["seq"], body_id, True)
            await asyncio.sleep(rng.uniform(0, 0.06))

    async def batch_publisher(self, c: httpx.AsyncClient, ws: str, tag: str) -> None:
        rng = self.child_rng()
        ledger = self.ledgers[ws]
        n = 0
        while not self.stop_publishing.is_set():
            bodies = []
            for _ in range(rng.randrange(1, 10)):
                n += 1
                bodies.append({"id": f"{tag}-{n}", "pad": "y" * rng.randrange(0, 200)})
            r = await c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=bodies)
            assert r.status_code == 200, r.text
            answer = r.json()
            for seq, dup, body in zip(answer["seqs"], answer["duplicates"], bodies, strict=True):
                ledger.ack(seq, body["id"], dup)
            await asyncio.sleep(rng.uniform(0.05, 0.25))

    async def ws_publisher(self, ws: str, tag: str) -> None:
        rng = self.child_rng()
        ledger = self.ledgers[ws]
        n = 0
        while not self.stop_publishing.is_set():
            async with websockets.connect(f"{self.ws_base}/v1/workspaces/{ws}/ws") as sock:
                while not self.stop_publishing.is_set():
                    burst = []
                    for _ in range(rng.randrange(1, 6)):
                        n += 1
                        burst.append(f"{tag}-{n}")
                    for body_id in burst:
                        frame = {"op": "pub", "body": {"id": body_id}, "key": body_id}
                        await sock.send(json.dumps({**frame, "ref": body_id}))
                    for body_id in burst:
                        ack = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
                        assert ack["op"] == "ack" and ack["ref"] == body_id, ack
                        ledger.ack(ack["seq"], body_id, ack["duplicate"])
                    await asyncio.sleep(rng.uniform(0.02, 0.15))
                    if rng.random() < 0.1:
                        break  # hang up between bursts (every burst was acknowledged)

    # ----------------------------------------------------------- subscribers
    def done(self, ws: str, seen: Seen) -> bool:
        return ws in self.final and seen.cursor >= self.final[ws]

    @staticmethod
    def _hold(rng: random.Random) -> float:
        """How long this connection lives before the subscriber hangs up."""
        return rng.expovariate(1 / 1.5)

    async def sse_subscriber(self, c: httpx.AsyncClient, ws: str, name: str, by_id: bool) -> None:
        rng = self.child_rng()
        seen = Seen(name)
        self.seen[ws].append(seen)
        while not self.done(ws, seen):
            url = f"/v1/workspaces/{ws}/events?bodies=1"
            headers = {}
            if by_id and seen.seqs:
                headers["Last-Event-ID"] = str(seen.cursor)
            else:
                url += f"&after={seen.cursor}"
            deadline = time.monotonic() + self._hold(rng)
            async with c.stream("GET", url, headers=headers) as r:
                assert r.status_code == 200, await r.aread()
                event, data, last_id = "message", "", ""
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("id:"):
                        last_id = line[3:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif line == "" and data:
                        assert event == "message", self.gap_report(ws, seen, (event, data))
                        row = json.loads(data)
                        assert str(row["seq"]) == last_id
                        seen.take(row["seq"], row["body"])
                        event, data = "message", ""
                        if self.done(ws, seen) or time.monotonic() > deadline:
                            break  # hang up mid-stream
                    elif line == "" and time.monotonic() > deadline:
                        break
            seen.reconnects += 1
            await asyncio.sleep(rng.uniform(0, 0.1))

    async def nudge_subscriber(self, c: httpx.AsyncClient, ws: str, name: str) -> None:
        """The Hive pattern: SSE nudges say a seq exists; cursor reads fetch the rows."""
        rng = self.child_rng()
        seen = Seen(name)
        self.seen[ws].append(seen)
        while not self.done(ws, seen):
            deadline = time.monotonic() + self._hold(rng)
            async with c.stream("GET", f"/v1/workspaces/{ws}/events") as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        if line == "" and time.monotonic() > deadline:
                            break
                        continue
                    if json.loads(line[5:])["seq"] > seen.cursor:
                        await self._catch_up(c, ws, seen, rng)
                    if self.done(ws, seen) or time.monotonic() > deadline:
                        break
            seen.reconnects += 1
            await asyncio.sleep(rng.uniform(0, 0.1))

    async def _catch_up(
        self, c: httpx.AsyncClient, ws: str, seen: Seen, rng: random.Random
    ) -> None:
        while True:
            limit = rng.choice(("", f"&limit={rng.randrange(1, 300)}"))
            r = await c.get(f"/v1/workspaces/{ws}/envelopes?after={seen.cursor}{limit}")
            assert r.status_code == 200
            assert "x-relay-gap" not in r.headers, f"{seen.name}: retention outran the reader"
            for row in r.json():
                seen.take(row["seq"], row["body"])
            if r.headers.get("x-relay-more") != "true":
                return

    async def poll_subscriber(self, c: httpx.AsyncClient, ws: str, name: str) -> None:
        rng = self.child_rng()
        seen = Seen(name)
        self.seen[ws].append(seen)
        while not self.done(ws, seen):
            limit = rng.randrange(1, 500)
            url = f"/v1/workspaces/{ws}/envelopes?after={seen.cursor}&limit={limit}&wait=5"
            if rng.random() < 0.1:
                # Hang up mid-poll: the request is abandoned, nothing is consumed.
                try:
                    await asyncio.wait_for(c.get(url), rng.uniform(0, 0.2))
                except TimeoutError:
                    seen.reconnects += 1
                continue
            r = await c.get(url)
            assert r.status_code == 200
            assert "x-relay-gap" not in r.headers, f"{name}: retention outran the reader"
            rows = r.json()
            assert len(rows) <= limit
            for row in rows:
                seen.take(row["seq"], row["body"])

    async def ws_subscriber(self, ws: str, name: str) -> None:
        rng = self.child_rng()
        seen = Seen(name)
        self.seen[ws].append(seen)
        url = f"{self.ws_base}/v1/workspaces/{ws}/ws"
        while not self.done(ws, seen):
            deadline = time.monotonic() + self._hold(rng)
            try:
                # max_queue=None: with the library's default (16 frames) a client that
                # is a little behind has paused reading when it hangs up, so it never
                # reads the relay's close reply and close() waits out close_timeout
                # (10 s; python-websockets/websockets#1555). Ten seconds without a
                # subscriber outlasts CAP, and the test would report a gap that is the
                # load generator's, not the relay's. The relay bounds what it sends.
                async with websockets.connect(url, max_queue=None) as sock:
                    await sock.send(json.dumps({"op": "sub", "after": seen.cursor}))
                    while not self.done(ws, seen) and time.monotonic() < deadline:
                        try:
                            frame = json.loads(await asyncio.wait_for(sock.recv(), 0.5))
                        except TimeoutError:
                            continue
                        assert frame["op"] == "env", self.gap_report(ws, seen, frame)
                        seen.take(frame["seq"], frame["body"])
                    if rng.random() < 0.5:
                        sock.transport.abort()  # a device that drops off: no close hand-shake
            except websockets.ConnectionClosed as closed:
                # A subscriber that fell too far behind is let go (1013); it resumes.
                assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
            seen.reconnects += 1
            await asyncio.sleep(rng.uniform(0, 0.1))

    def gap_report(self, ws: str, seen: Seen, what: Any) -> str:
        acked = sorted(self.ledgers[ws].acked)
        behind = sum(1 for s in acked if s > seen.cursor)
        return f"{seen.name}: {what} at cursor {seen.cursor}, {behind} acknowledged rows behind"

    # ------------------------------------------------------------------ run
    async def run(self) -> tuple[int, int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        timeout = httpx.Timeout(WAIT, read=WAIT)
        async with (
            httpx.AsyncClient(base_url=self.base, limits=limits, timeout=timeout) as c,
            asyncio.TaskGroup() as tg,
        ):
            subscribers: list[asyncio.Task[None]] = []
            publishers: list[asyncio.Task[None]] = []
            for ws in WORKSPACES:
                subs: list[Awaitable[None]] = [
                    self.sse_subscriber(c, ws, f"{ws}/sse-id", by_id=True),
                    self.sse_subscriber(c, ws, f"{ws}/sse-after", by_id=False),
                    self.nudge_subscriber(c, ws, f"{ws}/nudge"),
                    self.poll_subscriber(c, ws, f"{ws}/poll"),
                    self.ws_subscriber(ws, f"{ws}/ws"),
                ]
                subscribers += [tg.create_task(s) for s in subs]  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            for ws in WORKSPACES:
                pubs: list[Awaitable[None]] = [
                    self.http_publisher(c, ws, f"{ws}-http"),
                    self.batch_publisher(c, ws, f"{ws}-batch"),
                    self.ws_publisher(ws, f"{ws}-ws"),
                ]
                publishers += [tg.create_task(p) for p in pubs]  # type: ignore[arg-type]

            pid = self.relay.proc.pid  # type: ignore[union-attr]
            warm_up = min(15.0, SOAK_SECS / 3)
            await self._sleep_unless_failed(warm_up, publishers + subscribers)
            await self._wait_for(lambda: all(len(g.acked) > CAP for g in self.ledgers.values()))
            rss_warm = rss_kib(pid)
            await self._sleep_unless_failed(SOAK_SECS - warm_up, publishers + subscribers)
            self.stop_publishing.set()
            await asyncio.wait_for(asyncio.gather(*publishers), WAIT)
            for ws, ledger in self.ledgers.items():
                self.final[ws] = max(ledger.acked)
            await asyncio.wait_for(asyncio.gather(*subscribers), WAIT)
            rss_end = rss_kib(pid)
            return rss_warm, rss_end

    @staticmethod
    async def _sleep_unless_failed(secs: float, tasks: list[asyncio.Task[None]]) -> None:
        """Sleep, but surface a failed task at once (the TaskGroup then cancels the rest)."""
        done, _ = await asyncio.wait(tasks, timeout=secs, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

    @staticmethod
    async def _wait_for(cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not cond():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.1)


def live_streams(relay: RelayProcess) -> float:
    text = httpx.get(relay.url + "/metrics", timeout=WAIT).text
    m = re.search(r"^hive_relay_live_streams (\S+)$", text, re.M)
    assert m
    return float(m.group(1))


def test_soak_every_acknowledged_envelope_reaches_every_subscriber_once_in_order() -> None:
    env = {
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_MAX_ENVELOPES": str(CAP),
        "HIVE_RELAY_KEEPALIVE_SECS": "1",
        "HIVE_RELAY_ACCESS_LOG": "false",
    }
    with RelayProcess(env=env) as relay:
        soak = Soak(relay)
        rss_warm, rss_end = asyncio.run(soak.run())

        total = 0
        for ws, ledger in soak.ledgers.items():
            expected = sorted(ledger.acked)
            total += len(expected)
            assert ledger.duplicates > 0, "no same-key retry happened"
            for seen in soak.seen[ws]:
                assert seen.seqs == expected, (
                    f"{seen.name}: {len(seen.seqs)} rows, {len(expected)} acknowledged; "
                    f"missing {sorted(set(expected) - set(seen.seqs))[:5]}, "
                    f"extra {sorted(set(seen.seqs) - set(expected))[:5]}"
                )
                assert seen.ids == [ledger.acked[s] for s in expected], seen.name
                assert seen.reconnects > 0, f"{seen.name} never hung up"
        assert total > 3 * CAP

        # Every stream slot comes back once the subscribers are gone.
        deadline = time.monotonic() + WAIT
        while live_streams(relay) != 0:
            assert time.monotonic() < deadline, "stream slots leaked"
            time.sleep(0.1)

        growth = rss_end - rss_warm
        allowed = rss_warm * RSS_MARGIN + RSS_SLACK_KIB
        print(
            f"soak: {SOAK_SECS:.0f} s, {total} envelopes acknowledged, RSS after warm-up "
            f"{rss_warm} KiB, at the end {rss_end} KiB"
        )
        assert growth <= allowed, (
            f"RSS grew {growth} KiB after warm-up ({rss_warm} → {rss_end} KiB); "
            f"allowed {allowed:.0f} KiB"
        )
        assert relay.stop() == 0
    assert_quiet_log(relay.logs())


# -------------------------------------------------------------- crashes under load
class Load:
    """Publishers on every transport pushing to a few workspaces until the relay goes
    away; records every acknowledgement, and nothing else counts."""

    def __init__(self, relay: RelayProcess, workspaces: tuple[str, ...]) -> None:
        self.relay = relay
        self.workspaces = workspaces
        self.acked: dict[str, dict[int, str]] = {ws: {} for ws in workspaces}
        # Every body id a publisher sent, answered or not: a write the relay took in
        # just before it died may be kept although its answer never left.
        self.sent: dict[str, set[str]] = {ws: set() for ws in workspaces}
        self.errors = 0

    def ack(self, ws: str, seq: int, body_id: str) -> None:
        assert self.acked[ws].get(seq, body_id) == body_id
        self.acked[ws][seq] = body_id

    async def http(self, ws: str, tag: str, batch: bool) -> None:
        n = 0
        async with httpx.AsyncClient(base_url=self.relay.url, timeout=10) as c:
            while True:
                n += 1
                ids = [f"{tag}-{n}-{i}" for i in range(5 if batch else 1)]
                self.sent[ws].update(ids)
                try:
                    if batch:
                        r = await c.post(
                            f"/v1/workspaces/{ws}/envelopes/batch", json=[{"id": i} for i in ids]
                        )
                        seqs = r.json()["seqs"] if r.status_code == 200 else []
                    else:
                        r = await c.post(f"/v1/workspaces/{ws}/envelopes", json={"id": ids[0]})
                        seqs = [r.json()["seq"]] if r.status_code == 200 else []
                except (httpx.HTTPError, ValueError):
                    self.errors += 1
                    return  # the relay is gone: whatever was not acknowledged may be lost
                for seq, body_id in zip(seqs, ids, strict=False):
                    self.ack(ws, seq, body_id)
                if r.status_code != 200:
                    assert r.status_code == 503, r.text  # shutting down
                    return

    async def socket(self, ws: str, tag: str) -> None:
        n = 0
        url = f"ws://127.0.0.1:{self.relay.port}/v1/workspaces/{ws}/ws"
        try:
            async with websockets.connect(url) as sock:
                while True:
                    n += 1
                    body_id = f"{tag}-{n}"
                    self.sent[ws].add(body_id)
                    await sock.send(json.dumps({"op": "pub", "body": {"id": body_id}}))
                    frame = json.loads(await asyncio.wait_for(sock.recv(), 10))
                    assert frame["op"] == "ack", frame
                    self.ack(ws, frame["seq"], body_id)
        except (websockets.ConnectionClosed, OSError, TimeoutError):
            self.errors += 1

    async def run(self, until: Callable[[], Awaitable[None]]) -> None:
        tasks = []
        for ws in self.workspaces:
            tasks += [
                asyncio.create_task(self.http(ws, f"{ws}-h", batch=False)),
                asyncio.create_task(self.http(ws, f"{ws}-b", batch=True)),
                asyncio.create_task(self.socket(ws, f"{ws}-w")),
            ]
        await until()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)


def _read_all(url: str, ws: str) -> tuple[dict[int, str], httpx.Headers]:
    r = httpx.get(f"{url}/v1/workspaces/{ws}/envelopes?after=0", timeout=WAIT)
    assert r.status_code == 200
    return {row["seq"]: row["body"]["id"] for row in r.json()}, r.headers


def _wait_acks(load: Load, n: int) -> Callable[[], Awaitable[None]]:
    async def until() -> None:
        deadline = time.monotonic() + WAIT
        while sum(len(a) for a in load.acked.values()) < n:
            assert time.monotonic() < deadline, "the load never got going"
            await asyncio.sleep(0.02)

    return until


def test_sigterm_under_load_with_a_snapshot_dir_keeps_everything_acknowledged(
    tmp_path: Path,
) -> None:
    """SIGTERM while publishers on every transport are pushing: the relay exits 0, and
    the restarted relay serves every envelope it acknowledged, under the same epoch."""
    env = {
        "HIVE_RELAY_DATA_DIR": str(tmp_path),
        "HIVE_RELAY_SNAPSHOT_INTERVAL": "1",
        "HIVE_RELAY_PUSH_RATE": "0",
    }
    workspaces = ("term-a", "term-b")
    relay = RelayProcess(env=env).start()
    epoch = _read_all(relay.url, "term-a")[1]["x-relay-epoch"]
    load = Load(relay, workspaces)

    async def until() -> None:
        await _wait_acks(load, 1500)()
        relay.send_signal(signal.SIGTERM)  # mid-flight: the load keeps pushing

    asyncio.run(load.run(until))
    assert relay.stop() == 0
    assert load.errors > 0  # the publishers did meet the shutdown
    with RelayProcess(env=env) as again:
        for ws in workspaces:
            stored, headers = _read_all(again.url, ws)
            assert headers["x-relay-epoch"] == epoch  # a clean stop keeps the epoch
            missing = {s: i for s, i in load.acked[ws].items() if stored.get(s) != i}
            assert not missing, f"{ws}: {len(missing)} acknowledged envelopes lost"
            r = httpx.post(f"{again.url}/v1/workspaces/{ws}/envelopes", json={"id": "after"})
            assert r.json()["seq"] > max(stored)
    assert_quiet_log(relay.logs() + again.logs())


def test_kill_9_under_load_never_rewinds_and_tells_clients(tmp_path: Path) -> None:
    """kill -9 while publishers push: after the restart every new seq is above every
    seq acknowledged before, the epoch differs on every kind of read (clients learn
    that history may be lost), and a client's old cursor sees exactly the new rows."""
    env = {
        "HIVE_RELAY_DATA_DIR": str(tmp_path),
        "HIVE_RELAY_SNAPSHOT_INTERVAL": "1",
        "HIVE_RELAY_PUSH_RATE": "0",
        # everysec may lose the last second on a machine crash, so the epoch must
        # change; `always` keeps it (tests/test_journal_process.py).
        "HIVE_RELAY_FSYNC": "everysec",
    }
    workspaces = ("k9-a", "k9-b")
    relay = RelayProcess(env=env).start()
    epoch = _read_all(relay.url, "k9-a")[1]["x-relay-epoch"]
    load = Load(relay, workspaces)

    async def until() -> None:
        await _wait_acks(load, 1500)()
        relay.send_signal(signal.SIGKILL)

    asyncio.run(load.run(until))
    relay.stop()
    with RelayProcess(env=env) as again:
        for ws in workspaces:
            before = max(load.acked[ws])
            stored, headers = _read_all(again.url, ws)
            assert headers["x-relay-epoch"] != epoch
            # What the relay kept is history as it was: nothing invented. Rows above the
            # last acknowledged seq are writes in flight at the kill (taken and journalled,
            # their answers never sent); they are kept, never renumbered.
            for seq, body_id in stored.items():
                assert body_id in load.sent[ws]
                assert load.acked[ws].get(seq, body_id) == body_id
            in_flight = sorted(seq for seq in stored if seq > before)
            new = [
                httpx.post(
                    f"{again.url}/v1/workspaces/{ws}/envelopes", json={"id": f"n{i}"}
                ).json()["seq"]
                for i in range(3)
            ]
            assert min(new) > max(stored, default=before), "a seq was reused after the crash"
            rows = httpx.get(f"{again.url}/v1/workspaces/{ws}/envelopes?after={before}").json()
            assert [row["seq"] for row in rows] == in_flight + new
        new_epoch = headers["x-relay-epoch"]
        with httpx.Client(base_url=again.url, timeout=WAIT) as c:
            with c.stream("GET", f"/v1/workspaces/{workspaces[0]}/events") as sse:
                assert sse.headers["x-relay-epoch"] == new_epoch

        async def socket_epoch() -> str:
            url = f"ws://127.0.0.1:{again.port}/v1/workspaces/{workspaces[0]}/ws"
            async with websockets.connect(url) as sock:
                return str(sock.response.headers["x-relay-epoch"])

        assert asyncio.run(socket_epoch()) == new_epoch
