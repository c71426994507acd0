"""The herd: N followers of one workspace, a publisher at R envelopes/s.

    python bench/herd.py --url http://127.0.0.1:8080 --followers 200 --mode nudge \
        --relay-pid 1234

`--mode nudge` follows the way the Hive desktop client does: one SSE nudge
stream (`GET …/events`) and, after every nudge whose seq is past the cursor,
`GET …/envelopes?after=<cursor>` on a second keep-alive connection, again
while the answer says `X-Relay-More: true`. Nudges that arrive while a read is
in flight are not lost: the next read starts from the cursor the last one
reached, so it covers them (the SDK's `stream_feed` skips nudges at or below
its cursor the same way). `--mode sse` follows with bodies on the stream
(`?bodies=1`), for comparison.

The followers are spread over `--procs` generator processes, each one asyncio
loop (uvloop when installed) of plain protocols whose HTTP/1.1 responses are
parsed by httptools (the parser uvicorn uses): keep-alive, Content-Length and
chunked bodies. Follower i connects from its own loopback address
(127.1.x.y), as every device has its own address, so the relay's default
per-client stream cap applies to each follower as it would in the field.

The publisher (this process) stamps each body with `time.time()` just before
its POST; a follower measures publish → body in hand when it has parsed the
row. Over the publishing window (until every follower has every envelope, or
a deadline) it samples the CPU seconds of the relay (`--relay-pid`) and of
each generator process from /proc/<pid>/stat, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

import httptools
import msgspec

PAD = "x" * 900  # with the stamp, a body of about 1 KiB
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------ bookkeeping
def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_stat_cpu(f.read())


def parse_stat_cpu(stat: bytes) -> float:
    # The command name (field 2) is in parentheses and may hold spaces or ")":
    # count fields from the last ")". utime and stime are fields 14 and 15.
    rest = stat[stat.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def percentile(sorted_values: list[float] | array, q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass
class Tally:
    """What one follower received: enough to say "every envelope, once, in order"."""

    count: int = 0
    seq_sum: int = 0
    last: int = 0
    disorder: int = 0  # rows at or below the previous one (duplicates, reordering)

    def add(self, seq: int) -> None:
        if seq <= self.last:
            self.disorder += 1
        self.last = max(self.last, seq)
        self.count += 1
        self.seq_sum += seq

    def complete(self, sent: int, seq_sum: int) -> bool:
        return self.count == sent and self.seq_sum == seq_sum and not self.disorder


class SSESplitter:
    """Splits a text/event-stream into the `data` of each event (comments dropped)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.buf + chunk
        events = buf.split(b"\n\n")
        self.buf = events.pop()
        out = []
        for event in events:
            data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
            if data:
                out.append(b"\n".join(data))
        return out


class Row(msgspec.Struct):
    seq: int
    body: msgspec.Raw


class Stamp(msgspec.Struct):
    t: float


class Nudge(msgspec.Struct):
    seq: int


ROWS = msgspec.json.Decoder(list[Row])
ROW = msgspec.json.Decoder(Row)
STAMP = msgspec.json.Decoder(Stamp)
NUDGE = msgspec.json.Decoder(Nudge)


# ------------------------------------------------------------ HTTP/1.1 client
class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: GETs one at a time, or one SSE stream."""

    def __init__(self, on_event: Callable[[bytes], None] | None = None) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.on_event = on_event  # set for a stream: called with each event's data
        self.sse = SSESplitter()
        self.waiter: asyncio.Future[tuple[int, bool, bytes]] | None = None
        self.more = False
        self.body: list[bytes] = []
        self._header = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.more = False
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-relay-more":
            self.more = value.strip().lower() == b"true"

    def on_headers_complete(self) -> None:
        if self.on_event is not None:
            status = self.parser.get_status_code()
            if status != 200:
                raise RuntimeError(f"stream answered {status}")
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((status, False, b""))

    def on_body(self, body: bytes) -> None:
        if self.on_event is not None:
            for data in self.sse.feed(body):
                self.on_event(data)
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.more, b"".join(self.body)))
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes) -> tuple[int, bool, bytes]:
        """Send one request head; (status, X-Relay-More, body) of its answer."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head)
        return await self.waiter


async def connect(
    host: str, port: int, source: str, on_event: Callable[[bytes], None] | None = None
) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: Conn(on_event), host, port, local_addr=(source, 0)
    )
    return conn


def source_address(i: int) -> str:
    """Follower i's own loopback address: 127.1.0.1, 127.1.0.2, … (never .0 or .255)."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


# ------------------------------------------------------------ followers
@dataclass
class Follower:
    tally: Tally = field(default_factory=Tally)
    newest: int = -1  # newest seq a nudge announced (the first one: the head)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    gets: int = 0


def record(follower: Follower, lat: array, seq: int, body: bytes, now: float) -> None:
    follower.tally.add(seq)
    lat.append(now - STAMP.decode(body).t)


async def follow_nudge(
    host: str, port: int, ws: str, source: str, f: Follower, lat: array, live: asyncio.Event
) -> None:
    def on_nudge(data: bytes) -> None:
        seq = NUDGE.decode(data).seq
        if seq > f.newest:
            f.newest = seq
            f.wake.set()

    stream = await connect(host, port, source, on_nudge)
    await stream.request(
        b"GET /v1/workspaces/%s/events HTTP/1.1\r\nHost: %s\r\n"
        b"Accept: text/event-stream\r\n\r\n" % (ws.encode(), host.encode())
    )
    reads = await connect(host, port, source)
    await f.wake.wait()  # the first nudge: the head the cursor starts from
    pos = f.newest
    live.set()
    path = b"GET /v1/workspaces/%s/envelopes?after=" % ws.encode()
    tail = b" HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
    while True:
        f.wake.clear()
        while f.newest > pos:
            status, more, body = await reads.request(b"%s%d%s" % (path, pos, tail))
            f.gets += 1
            if status != 200:
                raise RuntimeError(f"read answered {status}: {body[:200]!r}")
            now = time.time()
            for row in ROWS.decode(body):
                record(f, lat, row.seq, row.body, now)
                pos = row.seq
            if not more:
                break
        if f.newest <= pos:
            await f.wake.wait()


async def follow_sse(
    host: str, port: int, ws: str, source: str, f: Follower, lat: array, live: asyncio.Event
) -> None:
    def on_row(data: bytes) -> None:
        row = ROW.decode(data)
        record(f, lat, row.seq, row.body, time.time())

    stream = await connect(host, port, source, on_row)
    await stream.request(
        b"GET /v1/workspaces/%s/events?bodies=1 HTTP/1.1\r\nHost: %s\r\n"
        b"Accept: text/event-stream\r\n\r\n" % (ws.encode(), host.encode())
    )
    live.set()
    await stream.closed


async def generator(
    pipe: Connection, host: str, port: int, ws: str, mode: str, first: int, n: int
) -> None:
    follow = follow_nudge if mode == "nudge" else follow_sse
    followers = [Follower() for _ in range(n)]
    lat = array("d")
    lives = [asyncio.Event() for _ in range(n)]
    tasks = []
    for i in range(n):  # in small steps: a burst of 1,000 connects fills the backlog
        coro = follow(host, port, ws, source_address(first + i), followers[i], lat, lives[i])
        tasks.append(asyncio.create_task(coro))
        if i % 50 == 49:
            await asyncio.sleep(0.02)
    ready = asyncio.gather(*(e.wait() for e in lives))
    failed = asyncio.ensure_future(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
    done, _ = await asyncio.wait([ready, failed], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        errors = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
        pipe.send({"error": errors[:3] or ["followers not ready in 60 s"]})
        return
    pipe.send({"ready": n})
    loop = asyncio.get_running_loop()
    sent, seq_sum, deadline = await loop.run_in_executor(None, pipe.recv)
    end = time.time() + deadline
    while time.time() < end and not all(f.tally.complete(sent, seq_sum) for f in followers):
        await asyncio.sleep(0.02)
    failed.cancel()
    pipe.send(
        {
            "complete": sum(f.tally.complete(sent, seq_sum) for f in followers),
            "delivered": sum(f.tally.count for f in followers),
            "disorder": sum(f.tally.disorder for f in followers),
            "gets": sum(f.gets for f in followers),
            "errors": [repr(t.exception()) for t in tasks if t.done() and t.exception()][:3],
        }
    )
    pipe.send_bytes(lat.tobytes())
    for t in tasks:
        t.cancel()


def generator_main(
    pipe: Connection, host: str, port: int, ws: str, mode: str, first: int, n: int
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(generator(pipe, host, port, ws, mode, first, n))


# ------------------------------------------------------------ the run
def publish(url: str, ws: str, rate: float, seconds: float) -> list[int]:
    import httpx

    seqs = []
    with httpx.Client(base_url=url, timeout=30) as c:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            target = start + len(seqs) / rate
            time.sleep(max(0.0, target - time.monotonic()))
            body = msgspec.json.encode({"t": time.time(), "i": len(seqs), "pad": PAD})
            r = c.post(
                f"/v1/workspaces/{ws}/envelopes",
                content=body,
                headers={"content-type": "application/json"},
            )
            r.raise_for_status()
            seqs.append(r.json()["seq"])
    return seqs


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """(first index, count) of each of `parts` near-equal shares of n followers."""
    base, extra = divmod(n, parts)
    shares, first = [], 0
    for p in range(parts):
        count = base + (p < extra)
        shares.append((first, count))
        first += count
    return [s for s in shares if s[1]]


def herd(
    url: str,
    followers: int,
    mode: str,
    rate: float,
    seconds: float,
    procs: int,
    relay_pid: int,
    profile: str | None = None,
    drain: float = 15.0,
) -> dict:
    """Run the herd; `drain`: seconds after the last publish for the rows to arrive."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    ws = f"herd-{mode}-{time.time_ns()}"
    ctx = mp.get_context("fork")
    workers = []
    for first, count in split(followers, procs):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=generator_main, args=(theirs, host, port, ws, mode, first, count), daemon=True
        )
        proc.start()
        workers.append((proc, mine))
    try:
        for _, pipe in workers:
            msg = pipe.recv()
            if "error" in msg:
                raise RuntimeError(f"a generator failed: {msg['error']}")
        time.sleep(0.5)
        relay0 = cpu_seconds(relay_pid)
        gen0 = [cpu_seconds(p.pid) for p, _ in workers]
        me0 = os.times()
        wall0 = time.monotonic()
        spy = None
        if profile:  # py-spy of the relay over the publishing window (needs ptrace rights)
            spy_bin = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy"
            spy = subprocess.Popen(
                [spy_bin, "record", "-p", str(relay_pid), "-r", "200", "-d", str(int(seconds)),
                 "-f", "raw", "-o", profile, "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        seqs = publish(url, ws, rate, seconds)
        publish_wall = time.monotonic() - wall0
        for _, pipe in workers:
            pipe.send((len(seqs), sum(seqs), drain))
        results = [pipe.recv() for _, pipe in workers]
        wall = time.monotonic() - wall0
        relay_cpu = cpu_seconds(relay_pid) - relay0
        gen_cpu = [cpu_seconds(p.pid) - c for (p, _), c in zip(workers, gen0, strict=True)]
        me1 = os.times()
        lat = array("d")
        for _, pipe in workers:
            lat.frombytes(pipe.recv_bytes())
        if spy is not None:
            spy.wait(60)
    finally:
        for proc, _ in workers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return summarize(
        mode=mode,
        followers=followers,
        rate=rate,
        sent=len(seqs),
        results=results,
        latencies=lat,
        relay_cpu=relay_cpu,
        generator_cpu=gen_cpu,
        publisher_cpu=(me1.user - me0.user) + (me1.system - me0.system),
        wall=wall,
        publish_wall=publish_wall,
    )


def summarize(
    *,
    mode: str,
    followers: int,
    rate: float,
    sent: int,
    results: list[dict],
    latencies: array,
    relay_cpu: float,
    generator_cpu: list[float],
    publisher_cpu: float,
    wall: float,
    publish_wall: float,
) -> dict:
    lat = sorted(latencies)
    delivered = sum(r["delivered"] for r in results)
    return {
        "mode": mode,
        "followers": followers,
        "rate": rate,
        "sent": sent,
        # Below `rate` when the relay answered the publisher's POSTs too slowly to keep up.
        "sent_per_s": sent / publish_wall if publish_wall else math.nan,
        "expected": sent * followers,
        "delivered": delivered,
        "complete_followers": sum(r["complete"] for r in results),
        "complete": sum(r["complete"] for r in results) == followers,
        "disorder": sum(r["disorder"] for r in results),
        "gets": sum(r["gets"] for r in results),
        "errors": [e for r in results for e in r["errors"]][:3],
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": (lat[-1] if lat else math.nan) * 1000,
        "relay_cpu_s": relay_cpu,
        "relay_cpu_per_1000": relay_cpu / delivered * 1000 if delivered else math.nan,
        "generator_cpu_s": generator_cpu,
        "generator_cpu_max_s": max(generator_cpu, default=0.0),
        "publisher_cpu_s": publisher_cpu,
        # Each generator is one single-threaded loop, as the relay is: none may
        # have worked harder than the relay, or it, not the relay, set the pace.
        "generators_below_relay": max(generator_cpu, default=0.0) < relay_cpu,
        "wall_s": wall,
        "mean_latency_ms": statistics.fmean(lat) * 1000 if lat else math.nan,
    }


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--relay-pid", type=int, required=True)
    p.add_argument("--followers", type=int, default=200)
    p.add_argument("--mode", choices=("nudge", "sse"), default="nudge")
    p.add_argument("--rate", type=float, default=20)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--procs", type=int, default=0, help="generator processes (0: one per 64)")
    p.add_argument("--py-spy", default=None, help="write a py-spy raw profile of the relay here")
    p.add_argument(
        "--drain", type=float, default=15.0, help="seconds after the last publish to wait for rows"
    )
    a = p.parse_args()
    procs = a.procs or min(16, max(2, math.ceil(a.followers / 64)))
    out = herd(a.url, a.followers, a.mode, a.rate, a.seconds, procs, a.relay_pid, a.py_spy, a.drain)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
