"""Publish rate and SSE fan-out latency: the Redis store next to the memory store.

    .venv/bin/python bench/redis_vs_memory.py [--posts 3000] [--subscribers 100]

One run, one machine, one Python asyncio load client (this process), a relay
subprocess per store: memory; Redis (a private redis-server with AOF, appendfsync
everysec, unless REDIS_URL is set); and two relays sharing that Redis with the
subscribers on one and the publisher on the other (fan-out across instances).
Then, with two relays each (publish on A; fan-out from A to subscribers on B): one
Redis with a replica and HIVE_RELAY_REDIS_MIN_REPLICAS=1; a Redis Cluster of 3
primaries (redis-cli --cluster create, tests/redisproc.py); and 3 primaries with a
replica each and MIN_REPLICAS=1 (these servers without AOF, so the rows differ by
round trips, not the disk). These rows publish to one workspace per connection
(a Cluster spreads workspaces over its shards; one workspace lives on one shard).
Request counts are bounded; figures are for comparison within the run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.relayproc import RelayProcess, free_port  # noqa: E402

ENV = {
    "HIVE_RELAY_PUSH_RATE": "0",
    "HIVE_RELAY_ACCESS_LOG": "false",
    "HIVE_RELAY_MAX_SSE": "0",
    "HIVE_RELAY_MAX_SSE_PER_CLIENT": "0",
}


RETRIES: list[bytes] = []  # 503s to subscribers (retried) and ended streams, reported


class Row(msgspec.Struct):
    seq: int
    body: dict


async def post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
) -> bytes:
    """One keep-alive HTTP/1.1 POST (httpx's pool is the bottleneck at this rate)."""
    writer.write(
        b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (path.encode(), len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return await reader.readexactly(size)


async def publish_rate(url: str, posts: int, conns: int, spread: bool = False) -> float:
    """POSTs per second; `spread`: each connection publishes to its own workspace."""
    host, port = url.removeprefix("http://").split(":")
    base = f"/v1/workspaces/pub-{time.time_ns()}"
    pad = b"x" * 900
    counter = iter(range(posts))
    numbers = iter(range(conns))

    async def worker() -> None:
        n = next(numbers)
        path = f"{base}-{n if spread else 0}/envelopes"
        reader, writer = await asyncio.open_connection(host, int(port))
        for i in counter:
            await post(reader, writer, path, b'{"i":%d,"pad":"%b"}' % (i, pad))
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return posts / (time.perf_counter() - start)


async def read_rate(url: str, reads: int, conns: int) -> float:
    """GETs of one workspace's envelope page (20 rows of ~1 KiB) over keep-alive."""
    host, port = url.removeprefix("http://").split(":")
    ws = f"read-{time.time_ns()}"
    reader, writer = await asyncio.open_connection(host, int(port))
    for i in range(20):
        await post(reader, writer, f"/v1/workspaces/{ws}/envelopes", b'{"i":%d}' % i)
    writer.close()
    request = b"GET /v1/workspaces/%b/envelopes?limit=20 HTTP/1.1\r\nHost: x\r\n\r\n" % ws.encode()
    counter = iter(range(reads))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in counter:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(size)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return reads / (time.perf_counter() - start)


async def worker_rates(url: str, a: argparse.Namespace) -> list[str]:
    pub = await publish_rate(url, a.posts, a.conns)
    got = await read_rate(url, a.posts, a.conns)
    return [f"{pub:,.0f}", f"{got:,.0f}"]


async def subscriber(url: str, ws: str, lat: list[float], ready: asyncio.Barrier, n: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    path = f"/v1/workspaces/{ws}/events?bodies=1"
    while True:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200"):
            break
        # A 503 with Retry-After (the store not ready yet): retry, as clients do.
        assert head.startswith(b"HTTP/1.1 503"), head
        size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(size)
        RETRIES.append(body)
        writer.close()
        await asyncio.sleep(int(head.lower().split(b"retry-after:")[1].split(b"\r\n")[0]))
    await ready.wait()
    got = 0
    try:
        while got < n:
            line = await reader.readline()
            if not line:
                RETRIES.append(b"the relay ended the stream")  # counted as not delivered
                return
            i = line.find(b"data: {")
            if i < 0:
                continue
            row = msgspec.json.decode(line[i + 6 :].rstrip(), type=Row)
            lat.append(time.time() - row.body["t"])
            got += 1
    finally:
        writer.close()


async def fanout(pub_url: str, sub_url: str, subs: int, events: int, rate: float) -> dict:
    ws = f"fan-{time.time_ns()}"
    lat: list[float] = []
    ready = asyncio.Barrier(subs + 1)
    tasks = [asyncio.create_task(subscriber(sub_url, ws, lat, ready, events)) for _ in range(subs)]
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(0.3)
    host, port = pub_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    start = time.monotonic()
    for i in range(events):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        body = b'{"t":%r,"i":%d,"pad":"%b"}' % (time.time(), i, b"x" * 900)
        await post(reader, writer, f"/v1/workspaces/{ws}/envelopes", body)
    writer.close()
    done, pending = await asyncio.wait(tasks, timeout=30)
    for t in pending:
        t.cancel()
    lat.sort()
    return {
        "p50": statistics.median(lat) * 1000,
        "p99": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
        "complete": len(lat) == subs * events and not pending,
    }


class Redis:
    def __init__(self) -> None:
        self.url = os.environ.get("REDIS_URL", "")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Redis:
        if self.url:
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not installed (or set REDIS_URL)")
        port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
             "--maxmemory-policy", "noeviction", "--logfile", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            shutil.rmtree(self.dir, ignore_errors=True)


async def measure(
    pub: str, sub: str, a: argparse.Namespace, publish: bool, spread: bool = False
) -> list[str]:
    rate = await publish_rate(pub, a.posts, a.conns, spread) if publish else None
    RETRIES.clear()
    fan = await fanout(pub, sub, a.subscribers, a.events, a.rate)
    if RETRIES:
        print(f"{len(RETRIES)} subscriber 503s or ended streams: {RETRIES[0]!r}", file=sys.stderr)
    return [
        f"{rate:,.0f}" if rate else "–",
        f"{fan['p50']:.1f}",
        f"{fan['p99']:.1f}",
        "yes" if fan["complete"] else "NO",
    ]


def two_relays(url: str, extra: dict[str, str], a: argparse.Namespace) -> list[str]:
    env = {**ENV, "HIVE_RELAY_STORE": url, **extra}
    with RelayProcess(env=env) as one, RelayProcess(env=env) as two:
        row = asyncio.run(measure(one.url, two.url, a, True, spread=True))
        if row[-1] != "yes":
            ended = [ln for ln in two.logs().splitlines() if "SSE" in ln or "Redis" in ln]
            print("\n".join(ended[-5:]), file=sys.stderr)
        return row


def shared_rows(a: argparse.Namespace) -> list[list[str]]:
    """Replica-acknowledged writes and the Cluster store, two relays each."""
    from tests.redisproc import RedisCluster, RedisServer

    acked = {"HIVE_RELAY_REDIS_MIN_REPLICAS": "1"}
    rows = []
    # No AOF on these servers, so their rows compare with each other on the network
    # round trips (WAIT, shards), not the disk; the "redis" row above has AOF everysec.
    with RedisServer() as primary, RedisServer(replica_of=primary.port) as r:
        client = r.client()
        while client.info("replication").get("master_link_status") != "up":
            time.sleep(0.05)
        client.close()
        label = "redis + replica, 2 relays, spread"
        rows.append([label, *two_relays(primary.url, {}, a)])
        rows.append([label + ", MIN_REPLICAS=1", *two_relays(primary.url, acked, a)])
    with RedisCluster(primaries=3, replicas=0) as cluster:
        rows.append(["cluster 3 primaries, 2 relays, spread", *two_relays(cluster.url, {}, a)])
    with RedisCluster(primaries=3, replicas=1) as cluster:
        label = "cluster 3 primaries + 3 replicas, 2 relays, spread, MIN_REPLICAS=1"
        rows.append([label, *two_relays(cluster.url, acked, a)])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--posts", type=int, default=3000, help="POSTs for the publish rate")
    p.add_argument("--conns", type=int, default=16, help="concurrent publishers")
    p.add_argument("--subscribers", type=int, default=100, help="SSE subscribers")
    p.add_argument("--events", type=int, default=100, help="envelopes fanned out")
    p.add_argument("--rate", type=float, default=50, help="fan-out envelopes per second")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.add_argument(
        "--no-cluster", action="store_true", help="leave out the replica and Cluster rows"
    )
    p.add_argument(
        "--workers",
        action="store_true",
        help="instead: publish and read rates of one relay on Redis with 1 and 2 workers",
    )
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.workers:
        out = []
        with Redis() as redis:
            for n in (1, 2):
                env = {**ENV, "HIVE_RELAY_STORE": redis.url, "HIVE_RELAY_WORKERS": str(n)}
                with RelayProcess(env=env) as relay:
                    out.append([str(n), *asyncio.run(worker_rates(relay.url, a))])
        print(f"\nRedis store; {a.posts} POSTs, then {a.posts} page GETs, over {a.conns} conns\n")
        print("workers  publish/s  reads/s")
        for r in out:
            print(f"{r[0]:<8} {r[1]:>9}  {r[2]:>7}")
        return
    rows = []
    with RelayProcess(env=ENV) as relay:
        rows.append(["memory", *asyncio.run(measure(relay.url, relay.url, a, True))])
    with (
        Redis() as redis,
        RelayProcess(env={**ENV, "HIVE_RELAY_STORE": redis.url}) as one,
        RelayProcess(env={**ENV, "HIVE_RELAY_STORE": redis.url}) as two,
    ):
        rows.append(["redis", *asyncio.run(measure(one.url, one.url, a, True))])
        across = asyncio.run(measure(one.url, two.url, a, False))
        rows.append(["redis, 2 relays (pub A, sub B)", *across])
    if a.no_cluster:
        pass
    elif shutil.which("redis-cli") is None or os.environ.get("REDIS_URL"):
        print("skipping the replica and Cluster rows: they need redis-cli and their own servers")
    else:
        rows += shared_rows(a)
    head = ["store", "publish/s", "fan-out p50 ms", "p99 ms", "all delivered"]
    if a.json:
        print(json.dumps([dict(zip(head, r, strict=True)) for r in rows]))
        return
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(
        f"\n{a.posts} POSTs over {a.conns} connections; fan-out: {a.subscribers} SSE "
        f"subscribers, {a.events} envelopes at {a.rate:g}/s (~1 KiB bodies)\n"
    )
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
