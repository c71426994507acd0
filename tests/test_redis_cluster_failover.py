"""A Redis Cluster losing a primary, and a slot moving, under load (issue 15).

Real processes: a 3-primary cluster (tests/redisproc.py `RedisCluster`, node timeout
1 s), two relays on it, publishers on both relays and SSE subscribers on both.

* Failover, `MIN_REPLICAS=1`: one primary is SIGKILLed and its replica takes over;
  the old primary comes back as a replica. Afterwards every acknowledged envelope is
  stored once with its seq, seqs strictly increase per workspace, every subscriber
  received exactly the stored rows once in order (no row a failover erased: a row
  is announced only after WAIT), and both relays kept serving without a restart.
* The same with `MIN_REPLICAS=0` prints how many acknowledged envelopes the failover
  lost (docs/scaling.md has the measured figure); it asserts only what asynchronous
  replication still promises (no duplicates, seqs increase, relays recover).
* Reshard: `redis-cli --cluster reshard` moves the slot of a live workspace to
  another primary while envelopes are published: nothing lost, and no subscriber's
  stream reconnects or misses a row.
* Notify-after-WAIT in a Cluster: with the slot primary's replica paused, a row
  answered 503 reaches no subscriber or reader on the other relay; the retry that
  succeeds announces it once (SPUBLISH after WAIT on the slot primary).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.redisproc import RedisCluster, own_server_required
from tests.relayproc import RelayProcess
from tests.test_redis_replicas import SseRecorder

pytest.importorskip("redis", reason="the redis extra is not installed")
from redis.crc import key_slot

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WAIT = 30.0  # upper bound for any single wait; tests never assert on durations


def env(url: str, min_replicas: int) -> dict[str, str]:
    return {
        "HIVE_RELAY_STORE": url,
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_KEEPALIVE_SECS": "0.3",
        "HIVE_RELAY_REDIS_MIN_REPLICAS": str(min_replicas),
        "HIVE_RELAY_REDIS_WAIT_MS": "300",
    }


def spread(cluster: RedisCluster) -> list[str]:
    """One workspace per primary, so every shard carries load."""
    return [names[0] for names in cluster.workspaces_per_shard(1, prefix="w").values()]


@dataclass
class Follower:
    """An SSE subscriber with bodies that, like the SDK, resumes from its last seq."""

    ws: str
    rows: list[Any] = field(default_factory=list)
    connects: int = 0

    async def run(self, c: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            after = self.rows[-1]["seq"] if self.rows else 0
            try:
                async with c.stream(
                    "GET",
                    f"/v1/workspaces/{self.ws}/events",
                    params={"bodies": "1", "after": after},
                ) as s:
                    if s.status_code != 200:
                        await asyncio.sleep(0.2)
                        continue
                    self.connects += 1
                    buf = b""
                    async for chunk in s.aiter_raw():
                        buf += chunk
                        while b"\n\n" in buf:
                            event, buf = buf.split(b"\n\n", 1)
                            data = [ln[6:] for ln in event.split(b"\n") if ln.startswith(b"data: ")]
                            if data:
                                self.rows.append(json.loads(b"\n".join(data)))
            except httpx.HTTPError:
                await asyncio.sleep(0.2)


@dataclass
class Load:
    """Publishers on both relays for every workspace, each retrying a 503 with its key."""

    clients: list[httpx.AsyncClient]
    workspaces: list[str]
    acked: dict[tuple[str, str], int] = field(default_factory=dict)  # (ws, key) -> seq
    bodies: dict[tuple[str, str], int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)

    async def publish(self, c: httpx.AsyncClient, ws: str, key: str, n: int) -> None:
        async with asyncio.timeout(WAIT * 2):
            while True:
                try:
                    r = await c.post(
                        f"/v1/workspaces/{ws}/envelopes",
                        json={"n": n, "key": key},
                        headers={"Idempotency-Key": key},
                    )
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
                    continue
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    self.acked[(ws, key)] = r.json()["seq"]
                    self.bodies[(ws, key)] = n
                    return
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) > 0
                await asyncio.sleep(0.1)

    async def run(self, tag: str, count: int, pause: float = 0.02) -> None:
        async def one(idx: int, c: httpx.AsyncClient, ws: str) -> None:
            for n in range(count):
                await self.publish(c, ws, f"{tag}-{idx}-{n}", n)
                await asyncio.sleep(pause)

        await asyncio.gather(
            *(
                one(i, c, ws)
                for i, (c, ws) in enumerate((c, ws) for c in self.clients for ws in self.workspaces)
            )
        )


async def stored(c: httpx.AsyncClient, ws: str) -> list[Any]:
    rows: list[Any] = []
    while True:
        after = rows[-1]["seq"] if rows else 0
        r = await c.get(f"/v1/workspaces/{ws}/envelopes", params={"after": after})
        assert r.status_code == 200, r.text
        page = r.json()
        if not page:
            return rows
        rows += page


async def until(pred: Any, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not pred():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def failover_run(min_replicas: int) -> tuple[int, int, dict[int, int]]:
    """(acknowledged, lost, answers by status) for one failover under load."""
    own_server_required()
    with RedisCluster(primaries=3, replicas=1, node_timeout=1000) as cluster:
        workspaces = spread(cluster)
        victim = cluster.node_for(f"relay:{{{workspaces[0]}}}:log")
        heir = cluster.replica_of(victim)
        assert heir, "the victim primary has no replica"
        with (
            RelayProcess(env=env(cluster.url, min_replicas)) as one,
            RelayProcess(env=env(cluster.url, min_replicas)) as two,
        ):
            pids = (one.proc.pid if one.proc else 0, two.proc.pid if two.proc else 0)
            async with (
                httpx.AsyncClient(base_url=one.url, timeout=WAIT) as c1,
                httpx.AsyncClient(base_url=two.url, timeout=WAIT) as c2,
            ):
                stop = asyncio.Event()
                followers = [Follower(ws) for ws in workspaces for _ in (c1, c2)]
                tasks = [
                    asyncio.create_task(f.run(c, stop))
                    for f, c in zip(followers, [c1, c2] * len(workspaces), strict=True)
                ]
                await until(lambda: all(f.connects for f in followers), "every subscriber")
                load = Load([c1, c2], workspaces)
                await load.run("before", 5)
                during = asyncio.create_task(load.run("during", 40, pause=0.05))
                await until(lambda: len(load.acked) >= 6 * 5 + 12, "load before the kill")
                victim.kill()
                await until(
                    lambda: cluster.node_for(f"relay:{{{workspaces[0]}}}:log") is heir[0],
                    "the replica to take over",
                )
                # The old primary comes back and rejoins as the new primary's replica,
                # so MIN_REPLICAS=1 writes of that shard can be acknowledged again.
                victim.start()
                await during
                await load.run("after", 3)
                total = len(load.acked)
                # Every acknowledged envelope that is stored reaches every subscriber.
                results = {ws: await stored(c1, ws) for ws in workspaces}
                for f in followers:
                    want = len(results[f.ws])
                    await until(
                        lambda f=f, want=want: len({r["seq"] for r in f.rows}) >= want,
                        f"subscriber of {f.ws}",
                    )
                stop.set()
                for t in tasks:
                    t.cancel()
                assert (one.proc and one.proc.pid, two.proc and two.proc.pid) == pids
                assert one.proc is not None and one.proc.poll() is None
                assert two.proc is not None and two.proc.poll() is None
        lost = 0
        for ws in workspaces:
            rows = results[ws]
            seqs = [r["seq"] for r in rows]
            assert seqs == sorted(set(seqs)), f"{ws}: seqs not strictly increasing"
            by_key = {r["body"]["key"]: r for r in rows}
            assert len(by_key) == len(rows), f"{ws}: an envelope stored twice"
            for (w, key), seq in load.acked.items():
                if w != ws:
                    continue
                if key not in by_key:
                    lost += 1
                    continue
                assert by_key[key]["seq"] == seq
                assert by_key[key]["body"]["n"] == load.bodies[(w, key)]
            for f in (f for f in followers if f.ws == ws):
                got = [r["seq"] for r in f.rows]
                if min_replicas:
                    assert got == seqs, f"{ws}: a subscriber's rows differ from the store"
                else:
                    # Every stored row once, in order; a row the failover erased may
                    # have been shown before it vanished (asynchronous replication).
                    assert got == sorted(set(got))
                    assert [q for q in got if q in set(seqs)] == seqs
        assert 500 not in load.statuses
        return total, lost, load.statuses


async def test_failover_with_min_replicas_1_loses_no_acknowledged_envelope() -> None:
    total, lost, statuses = await failover_run(1)
    print(f"\nMIN_REPLICAS=1: {total} acknowledged, {lost} lost in the failover; {statuses}")
    assert lost == 0


async def test_failover_with_min_replicas_0_reports_what_it_lost() -> None:
    total, lost, statuses = await failover_run(0)
    # Not asserted: asynchronous replication may lose what the primary had not yet
    # sent. The figure goes into docs/scaling.md.
    print(f"\nMIN_REPLICAS=0: {total} acknowledged, {lost} lost in the failover; {statuses}")


async def test_resharding_a_live_workspace_loses_nothing_and_interrupts_no_stream() -> None:
    own_server_required()
    with RedisCluster(primaries=3, replicas=0, node_timeout=1000) as cluster:
        owners = sorted(cluster.slot_owners().items())
        first_slot, source_port = owners[0]
        # A workspace in the first slot of a primary: `reshard --cluster-slots 1` moves
        # exactly that slot (redis-cli takes a source's slots lowest first).
        ws = next(f"m{i}" for i in range(1 << 20) if key_slot(f"m{i}".encode()) == first_slot)
        source = next(n for n in cluster.nodes if n.port == source_port)
        target = next(n for n in cluster.nodes if n.port != source_port)
        with (
            RelayProcess(env=env(cluster.url, 0)) as one,
            RelayProcess(env=env(cluster.url, 0)) as two,
        ):
            async with (
                httpx.AsyncClient(base_url=one.url, timeout=WAIT) as c1,
                httpx.AsyncClient(base_url=two.url, timeout=WAIT) as c2,
            ):
                stop = asyncio.Event()
                followers = [Follower(ws), Follower(ws)]
                tasks = [
                    asyncio.create_task(f.run(c, stop))
                    for f, c in zip(followers, (c1, c2), strict=True)
                ]
                await until(lambda: all(f.connects for f in followers), "every subscriber")
                load = Load([c1, c2], [ws])
                await load.run("before", 10)
                during = asyncio.create_task(load.run("during", 60, pause=0.02))
                await until(lambda: len(load.acked) >= 30, "load before the move")
                done = await asyncio.to_thread(
                    subprocess.run,
                    [
                        cluster.cli,
                        "--cluster",
                        "reshard",
                        f"127.0.0.1:{source.port}",
                        "--cluster-from",
                        cluster.node_id(source),
                        "--cluster-to",
                        cluster.node_id(target),
                        "--cluster-slots",
                        "1",
                        "--cluster-yes",
                    ],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                cluster.wait_ok()
                assert cluster.node_for(f"relay:{{{ws}}}:log") is target
                await during
                await load.run("after", 5)
                rows = await stored(c2, ws)
                await until(
                    lambda: all(len(f.rows) >= len(rows) for f in followers), "the subscribers"
                )
                stop.set()
                for t in tasks:
                    t.cancel()
        seqs = [r["seq"] for r in rows]
        assert seqs == sorted(set(seqs))
        assert sorted(load.acked.values()) == seqs  # every acknowledged one, once
        for f in followers:
            assert [r["seq"] for r in f.rows] == seqs
            assert f.connects == 1  # the stream was never interrupted
        assert 500 not in load.statuses
        print(f"\nreshard: {len(seqs)} envelopes, statuses {load.statuses}")


async def test_cluster_shows_no_row_before_its_wait_succeeded() -> None:
    """Notify-after-WAIT in a Cluster: SPUBLISH only after WAIT on the slot primary."""
    own_server_required()
    with RedisCluster(primaries=3, replicas=1, node_timeout=1000) as cluster:
        ws = spread(cluster)[1]
        replica = cluster.replica_of(cluster.node_for(f"relay:{{{ws}}}:log"))[0]
        with (
            RelayProcess(env=env(cluster.url, 1)) as one,
            RelayProcess(env=env(cluster.url, 1)) as two,
        ):
            async with (
                httpx.AsyncClient(base_url=one.url, timeout=WAIT) as c1,
                httpx.AsyncClient(base_url=two.url, timeout=WAIT) as c2,
            ):
                url = f"/v1/workspaces/{ws}/envelopes"
                sub = SseRecorder()
                task = asyncio.create_task(sub.run(c2, ws))
                try:
                    await sub.quiet_for(1)
                    r = await c1.post(url, json={"n": 0}, headers={"Idempotency-Key": "k0"})
                    assert r.status_code == 200, r.text
                    first = r.json()["seq"]
                    await sub.until(1)
                    replica.pause()
                    try:
                        r = await c1.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                        assert r.status_code == 503, r.text
                        await sub.quiet_for(3)
                        assert [row["seq"] for row in sub.rows] == [first]
                        r = await c2.get(url, params={"after": 0})
                        assert [row["seq"] for row in r.json()] == [first]
                        assert r.headers["x-relay-head"] == str(first)
                    finally:
                        replica.resume()
                    async with asyncio.timeout(WAIT):
                        while True:
                            r = await c1.post(url, json={"n": 1}, headers={"Idempotency-Key": "k1"})
                            if r.status_code == 200:
                                break
                            assert r.status_code == 503, r.text
                            await asyncio.sleep(0.2)
                    assert r.json()["duplicate"] is True
                    await sub.until(2)
                    await sub.quiet_for(2)
                    assert [row["seq"] for row in sub.rows] == [first, r.json()["seq"]]
                finally:
                    task.cancel()
