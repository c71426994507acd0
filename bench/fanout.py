"""Stream load generator (a separate process from the relay).

--subscribers N --rate R --seconds S: N SSE subscribers with bodies, a publisher
at R envelopes/s for S seconds; prints JSON with p50/p99 publish-to-delivery
latency and whether every subscriber received every envelope.

--hold N: open N idle SSE streams, print "held N", then wait to be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from urllib.parse import urlsplit

import httpx


async def open_stream(
    host: str, port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    return reader, writer


async def subscriber(
    host: str,
    port: int,
    ws: str,
    latencies: list[float],
    counts: list[int],
    idx: int,
    ready: asyncio.Event,
    ready_count: list[int],
    total: int,
) -> None:
    reader, _ = await open_stream(host, port, f"/v1/workspaces/{ws}/events?bodies=1")
    ready_count[0] += 1
    if ready_count[0] == total:
        ready.set()
    while True:
        line = await reader.readline()
        if not line:
            return
        # chunked framing lines are skipped; data lines carry the row
        i = line.find(b"data: ")
        if i < 0:
            continue
        row = json.loads(line[i + 6 :])
        latencies.append(time.time() - row["body"]["t"])
        counts[idx] += 1


async def fanout(url: str, n: int, rate: float, seconds: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    ws = f"fan-{time.time_ns()}"
    latencies: list[float] = []
    counts = [0] * n
    ready = asyncio.Event()
    ready_count = [0]
    tasks = [
        asyncio.create_task(subscriber(host, port, ws, latencies, counts, i, ready, ready_count, n))
        for i in range(n)
    ]
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(0.5)
    sent = 0
    async with httpx.AsyncClient(base_url=url) as c:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            target = start + sent / rate
            await asyncio.sleep(max(0.0, target - time.monotonic()))
            r = await c.post(
                f"/v1/workspaces/{ws}/envelopes",
                json={"t": time.time(), "i": sent, "pad": "x" * 900},
            )
            r.raise_for_status()
            sent += 1
    deadline = time.monotonic() + 10
    while sum(counts) < sent * n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    lat = sorted(latencies)
    return {
        "p50_ms": statistics.median(lat) * 1000 if lat else -1,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000 if lat else -1,
        "delivered": sum(counts),
        "expected": sent * n,
        "complete": all(c == sent for c in counts),
    }


async def hold(url: str, n: int) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    streams = []
    for start in range(0, n, 250):
        batch = await asyncio.gather(
            *(
                open_stream(host, port, f"/v1/workspaces/idle-{i % 50}/events")
                for i in range(start, min(n, start + 250))
            )
        )
        streams += batch
    print(f"held {len(streams)}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--subscribers", type=int, default=200)
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--hold", type=int, default=0)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.hold:
        asyncio.run(hold(a.url, a.hold))
    else:
        print(json.dumps(asyncio.run(fanout(a.url, a.subscribers, a.rate, a.seconds))))


if __name__ == "__main__":
    main()
