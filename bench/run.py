"""`make bench`: the relay next to its ceiling, in one run, on this machine.

Every figure is the median of several runs with its spread, and is shown as a
ratio to the ceiling measured in the same run (machines here are shared and
noisy: ratios travel, absolute numbers do not). Load generators are separate
processes: wrk for plain HTTP, bench/fanout.py (Python asyncio) for streams.

Writes the results table into docs/benchmarks.md between the RESULTS markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from tests.relayproc import RelayProcess, free_port  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
# The journal's figures (issue 14) have their own table, so either can be re-run alone.
JOURNAL_BEGIN, JOURNAL_END = "<!-- JOURNAL:BEGIN -->", "<!-- JOURNAL:END -->"


def wrk(
    url: str, seconds: int, conns: int, script: str | None = None, env: dict[str, str] | None = None
) -> float:
    cmd = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", str(HERE / script)]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def median_spread(values: list[float]) -> tuple[float, float]:
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med * 100 if med else 0.0


def paired(numerators: list[float], denominators: list[float]) -> float:
    """The median of per-round ratios. The two figures of a round are measured back
    to back, so a slow minute on the shared machine moves both; the ratio of two
    medians taken minutes apart does not cancel it."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


class Ceiling:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Ceiling:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ceiling.py"), "--port", str(self.port)]
        )
        for _ in range(200):
            try:
                httpx.get(self.url + "/v1/health", timeout=0.5)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("ceiling did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def relay_env(**extra: str) -> dict[str, str]:
    return {
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_ACCESS_LOG": "false",
        "HIVE_RELAY_MAX_SSE": "0",
        "HIVE_RELAY_MAX_SSE_PER_CLIENT": "0",
        **extra,
    }


def fill(base: str, ws: str, n: int, size: int = 1024) -> list[int]:
    """Push n unique ~size-byte envelopes with the batch endpoint; returns their seqs."""
    seqs: list[int] = []
    pad = "p" * (size - 40)
    with httpx.Client(base_url=base, timeout=60) as c:
        for start in range(0, n, 1000):
            batch = [{"n": f"{ws}-{i}", "p": pad} for i in range(start, min(n, start + 1000))]
            r = c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=batch)
            r.raise_for_status()
            seqs += r.json()["seqs"]
    return seqs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bench_publish_and_read(rounds: int, seconds: int) -> list[tuple[str, str, str, str]]:
    rows = []
    with Ceiling() as ceiling, RelayProcess(env=relay_env()) as relay:
        fill(relay.url, "pub", 50_000)  # at its 50,000 retention cap from the start
        seqs_1k = fill(relay.url, "r1k", 1_000)
        seqs_100k = fill(relay.url, "r100k", 100_000)
        pub_url = relay.url + "/v1/workspaces/pub/envelopes"
        ceil_pub, relay_pub, read_1k, read_100k, ceil_read, catchup, ceil_catchup = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        page5 = len(
            httpx.get(
                relay.url + f"/v1/workspaces/r1k/envelopes?after={seqs_1k[-6]}&limit=5"
            ).content
        )
        catch_size = len(
            httpx.get(
                relay.url + "/v1/workspaces/r100k/envelopes?after=0&limit=5000", timeout=30
            ).content
        )
        for _ in range(rounds):
            ceil_pub.append(wrk(ceiling.url + "/append", seconds, 32, "post_unique.lua"))
            relay_pub.append(wrk(pub_url, seconds, 32, "post_unique.lua"))
            ceil_read.append(wrk(ceiling.url + f"/read?size={page5}", seconds, 32))
            read_1k.append(
                wrk(
                    relay.url + f"/v1/workspaces/r1k/envelopes?after={seqs_1k[-6]}&limit=5",
                    seconds,
                    32,
                )
            )
            read_100k.append(
                wrk(
                    relay.url + f"/v1/workspaces/r100k/envelopes?after={seqs_100k[-6]}&limit=5",
                    seconds,
                    32,
                )
            )
            ceil_catchup.append(wrk(ceiling.url + f"/read?size={catch_size}", seconds, 8))
            catchup.append(
                wrk(relay.url + "/v1/workspaces/r100k/envelopes?after=0&limit=5000", seconds, 8)
            )
        cp, cps = median_spread(ceil_pub)
        rp, rps = median_spread(relay_pub)
        r1, r1s = median_spread(read_1k)
        r2, r2s = median_spread(read_100k)
        cr, crs = median_spread(ceil_read)
        cc, ccs = median_spread(ceil_catchup)
        rc, rcs = median_spread(catchup)
        rows += [
            ("Ceiling: append body to a list (POST)", f"{cp:,.0f} req/s ±{cps:.0f}%", "1.00", ""),
            (
                "Unique 1 KiB publish at the 50,000 cap",
                f"{rp:,.0f} req/s ±{rps:.0f}%",
                f"{paired(relay_pub, ceil_pub):.2f}",
                "≥ 0.7 (issue 2), ≥ 0.8 (issue 7)",
            ),
            (
                "Ceiling: prebuilt bytes, size of a 5-row page",
                f"{cr:,.0f} req/s ±{crs:.0f}%",
                "1.00",
                "",
            ),
            (
                "Newest 5 rows, 1,000 backlog",
                f"{r1:,.0f} req/s ±{r1s:.0f}%",
                f"{paired(read_1k, ceil_read):.2f}",
                "",
            ),
            (
                "Newest 5 rows, 100,000 backlog",
                f"{r2:,.0f} req/s ±{r2s:.0f}%",
                f"{paired(read_100k, ceil_read):.2f}",
                f"100k/1k = {paired(read_100k, read_1k):.2f} (target within 15%: ≥ 0.85)",
            ),
            (
                "Ceiling: prebuilt bytes, size of 5,000 rows",
                f"{cc:,.0f} req/s ±{ccs:.0f}%",
                "1.00",
                "",
            ),
            (
                "Catch-up read of 5,000 rows from cursor 0",
                f"{rc:,.0f} req/s ±{rcs:.0f}%",
                f"{paired(catchup, ceil_catchup):.2f}",
                "≥ 0.9 (issue 7)",
            ),
        ]
    return rows


def bench_batch_ws_scale(rounds: int, seconds: int) -> list[tuple[str, str, str, str]]:
    rows = []
    with RelayProcess(env=relay_env()) as relay:
        ws_base = f"ws://127.0.0.1:{relay.port}/v1/workspaces"
        single, batch, wsrate, spread = [], [], [], []
        for _ in range(rounds):
            single.append(
                wrk(relay.url + "/v1/workspaces/one/envelopes", seconds, 32, "post_unique.lua")
            )
            spread.append(wrk(relay.url, seconds, 32, "post_spread.lua", {"WORKSPACES": "1000"}))
            batch.append(
                100
                * wrk(
                    relay.url + "/v1/workspaces/batch/envelopes/batch", seconds, 8, "post_batch.lua"
                )
            )
            res = subprocess.run(
                [
                    sys.executable,
                    str(HERE / "wspub.py"),
                    "--url",
                    f"{ws_base}/wspub/ws",
                    "--sockets",
                    "4",
                    "--seconds",
                    str(seconds),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=seconds + 120,
            )
            wsrate.append(json.loads(res.stdout)["rate"])
        s1, s1s = median_spread(single)
        sp, sps = median_spread(spread)
        b, bs = median_spread(batch)
        w, wss = median_spread(wsrate)
        rows += [
            ("Publish, 1 workspace (single POST)", f"{s1:,.0f} env/s ±{s1s:.0f}%", "", ""),
            (
                "Publish spread over 1,000 workspaces",
                f"{sp:,.0f} env/s ±{sps:.0f}%",
                "",
                f"1,000 / 1 workspace = {paired(spread, single):.2f} (flat: O(1) per append)",
            ),
            (
                "Batch publish, 100 bodies per request",
                f"{b:,.0f} env/s ±{bs:.0f}%",
                "",
                "target ≥ 100,000 env/s",
            ),
            (
                "WebSocket publish, 4 sockets, 256 pub frames in flight",
                f"{w:,.0f} env/s ±{wss:.0f}%",
                "",
                f"{paired(wsrate, single):.2f}x the single-POST rate; target ≥ 1.5x",
            ),
        ]
        # Read cost against the number of workspaces: the first 5 of 10 rows.
        pad = "r" * 990
        with httpx.Client(base_url=relay.url, timeout=60) as c:
            for i in range(1000):
                c.post(
                    f"/v1/workspaces/rspread-{i}/envelopes/batch",
                    json=[{"i": j, "p": pad} for j in range(10)],
                ).raise_for_status()
        one_runs, many_runs = [], []
        for _ in range(rounds):  # interleaved, so each round's pair shares its minute
            for n, bucket in ((1, one_runs), (1000, many_runs)):
                env = {"WORKSPACES": str(n), "PREFIX": "rspread"}
                bucket.append(wrk(relay.url, seconds, 32, "get_spread.lua", env))
        one, many = median_spread(one_runs), median_spread(many_runs)
        rows += [
            ("Read 5 rows, 1 workspace", f"{one[0]:,.0f} req/s ±{one[1]:.0f}%", "", ""),
            (
                "Read 5 rows spread over 1,000 workspaces",
                f"{many[0]:,.0f} req/s ±{many[1]:.0f}%",
                "",
                f"1,000 / 1 workspace = {paired(many_runs, one_runs):.2f} (flat: O(1) lookup)",
            ),
        ]
        # Read cost against backlog size: newest 5 rows.
        seqs = {n: fill(relay.url, f"backlog{n}", n) for n in (1_000, 10_000, 100_000)}
        runs: dict[int, list[float]] = {n: [] for n in seqs}
        for _ in range(rounds):  # interleaved, as above
            for n, sq in seqs.items():
                url = relay.url + f"/v1/workspaces/backlog{n}/envelopes?after={sq[-6]}&limit=5"
                runs[n].append(wrk(url, seconds, 32))
        for n, values in runs.items():
            r, spr = median_spread(values)
            rows.append(
                (
                    f"Newest 5 rows at a {n:,} backlog",
                    f"{r:,.0f} req/s ±{spr:.0f}%",
                    "",
                    f"{paired(values, runs[1_000]):.2f} of the 1,000-backlog rate (flat: O(log n))",
                )
            )
    return rows


def bench_redis() -> list[tuple[str, str, str, str]]:
    res = subprocess.run(
        [sys.executable, str(HERE / "redis_vs_memory.py"), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    rows = []
    for r in json.loads(res.stdout.strip().splitlines()[-1]):
        rows.append(
            (
                f"Store {r['store']}: publish (Python client, 16 connections)",
                f"{r['publish/s']} env/s",
                "",
                f"fan-out to 100 SSE: p50 {r['fan-out p50 ms']} ms, p99 {r['p99 ms']} ms, "
                f"all delivered: {r['all delivered']}",
            )
        )
    return rows


def bench_icount() -> list[tuple[str, str, str, str]]:
    res = subprocess.run(
        [sys.executable, str(HERE / "icount.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    rows = []
    for line in res.stdout.strip().splitlines():
        d = json.loads(line)
        what = {
            "publish": "unique 1 KiB publish at the 50,000 cap",
            "read": "newest 5 rows of a 1,000 backlog",
        }[d["case"]]
        note = "repeatable on a busy machine; ceiling/relay ≈ the rate ratio"
        if d["relay_sha256_instr"] > 5000:  # reads hash nothing; a stray few are noise
            note += (
                f"; {d['relay_sha256_instr']:,} of the relay's are SHA-256 for dedup, slow under"
                f" valgrind (no SHA-NI): {d['ratio_without_sha256']:.2f} without them"
            )
        rows.append(
            (
                f"Server instructions per request, {what} (callgrind)",
                f"{d['relay_instr']:,} (ceiling {d['ceiling_instr']:,})",
                f"{d['ratio']:.2f}",
                note,
            )
        )
    return rows


def bench_fanout(subscribers: int, rate: float, seconds: float) -> list[tuple[str, str, str, str]]:
    out = []
    with RelayProcess(env=relay_env()) as relay:
        res = subprocess.run(
            [
                sys.executable,
                str(HERE / "fanout.py"),
                "--url",
                relay.url,
                "--subscribers",
                str(subscribers),
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 120,
        )
        data = json.loads(res.stdout.strip().splitlines()[-1])
    out.append(
        (
            f"SSE fan-out, {subscribers} subscribers with bodies, {rate:g} env/s",
            f"p50 {data['p50_ms']:.1f} ms, p99 {data['p99_ms']:.1f} ms",
            "",
            f"{'every' if data['complete'] else 'NOT every'} envelope to every subscriber "
            f"({data['delivered']}/{data['expected']}); target p99 < 50 ms",
        )
    )
    return out


def bench_idle_sse(connections: int) -> list[tuple[str, str, str, str]]:
    with RelayProcess(env=relay_env()) as relay:
        assert relay.proc is not None
        before = rss_kib(relay.proc.pid)
        holder = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fanout.py"),
                "--url",
                relay.url,
                "--hold",
                str(connections),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        line = holder.stdout.readline()  # "held N" once every stream is open
        held = int(line.split()[1])
        time.sleep(1.0)
        after = rss_kib(relay.proc.pid)
        holder.terminate()
        holder.wait(30)
    per = (after - before) / max(1, held)
    return [
        (
            f"Idle SSE connections held ({held:,})",
            f"{per:.1f} KiB RSS each",
            "",
            f"RSS {before / 1024:.0f} → {after / 1024:.0f} MiB; target ≤ 25 KiB",
        )
    ]


def bench_memory(envelopes: int) -> list[tuple[str, str, str, str]]:
    with RelayProcess(env=relay_env()) as relay:
        assert relay.proc is not None
        fill(relay.url, "warm", 1000)
        before = rss_kib(relay.proc.pid)
        fill(relay.url, "mem", envelopes)
        after = rss_kib(relay.proc.pid)
    per = (after - before) * 1024 / envelopes
    return [
        (
            f"RSS growth per retained 1 KiB envelope ({envelopes:,})",
            f"{per:,.0f} bytes",
            f"{per / 1024:.2f}x body",
            "target ≤ 1.5x (issue 7)",
        )
    ]


def bench_snapshot(envelopes: int) -> list[tuple[str, str, str, str]]:
    res = subprocess.run(
        [sys.executable, str(HERE / "snapshot_stall.py"), str(envelopes)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    d = json.loads(res.stdout)
    return [
        (
            f"Snapshot of {envelopes:,} 1 KiB envelopes",
            f"{d['write_s']:.2f} s to write {d['bytes'] / 2**20:.0f} MiB",
            "",
            f"longest event-loop stall {d['max_stall_ms']:.1f} ms "
            f"(consistent copy on the loop: {d['copy_ms']:.1f} ms)",
        )
    ]


def _journal_figures(url: str) -> tuple[float, float, float]:
    """(records per fsync, fsync p50 ms, fsync p99 ms) from the relay's status page."""
    page = httpx.get(url + "/").text
    m = re.search(r"([\d.]+) ms / ([\d.]+) ms", page)
    metrics = httpx.get(url + "/metrics").text
    total = re.search(r"hive_relay_journal_records_per_fsync_sum ([\d.e+]+)", metrics)
    count = re.search(r"hive_relay_journal_records_per_fsync_count ([\d.e+]+)", metrics)
    per = float(total.group(1)) / float(count.group(1)) if total and count else 0.0
    return per, float(m.group(1)) if m else 0.0, float(m.group(2)) if m else 0.0


def bench_journal(rounds: int, seconds: int) -> list[tuple[str, str, str, str]]:
    """Unique 1 KiB publishes: memory only, journal with fsync always, everysec."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    modes = {"memory only": {}, "always": {"HIVE_RELAY_FSYNC": "always"}}
    modes["everysec"] = {"HIVE_RELAY_FSYNC": "everysec"}
    for name, extra in modes.items():
        if name != "memory only":
            extra["HIVE_RELAY_DATA_DIR"] = str(tmp / name)
            extra["HIVE_RELAY_SNAPSHOT_INTERVAL"] = "86400"  # the journal's cost alone
    rates: dict[tuple[str, int], list[float]] = {}
    relays = {name: RelayProcess(env=relay_env(**extra)).start() for name, extra in modes.items()}
    rows: list[tuple[str, str, str, str]] = []
    try:
        for _ in range(rounds):
            for conns in (1, 8, 32):
                for name, relay in relays.items():
                    url = relay.url + f"/v1/workspaces/pub{conns}/envelopes"
                    rates.setdefault((name, conns), []).append(
                        wrk(url, seconds, conns, "post_unique.lua")
                    )
        figures = {name: _journal_figures(relays[name].url) for name in ("always", "everysec")}
    finally:
        for relay in relays.values():
            relay.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    targets = {("always", 32): "≥ 0.7 (issue 14)", ("everysec", 32): "≥ 0.9 (issue 14)"}
    for conns in (1, 8, 32):
        base = rates[("memory only", conns)]
        for name in modes:
            med, spread = median_spread(rates[(name, conns)])
            ratio = "1.00" if name == "memory only" else f"{paired(rates[(name, conns)], base):.2f}"
            rows.append(
                (
                    f"Unique 1 KiB publish, {conns} client{'s' if conns > 1 else ''}, {name}",
                    f"{med:,.0f} req/s ±{spread:.0f}%",
                    f"{ratio} (to memory only)",
                    targets.get((name, conns), ""),
                )
            )
    for name, (per, p50, p99) in figures.items():
        rows.append(
            (
                f"Journal, fsync {name}, over the runs above",
                f"{per:.1f} records per fsync",
                "",
                f"fsync p50 {p50:.2f} ms, p99 {p99:.2f} ms",
            )
        )
    return rows


def bench_replay(mib: int) -> list[tuple[str, str, str, str]]:
    res = subprocess.run(
        [sys.executable, str(HERE / "journal_replay.py"), "--mib", str(mib)],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    d = json.loads(res.stdout)
    return [
        (
            f"Restart after a crash: replay {d['journal_bytes'] / 2**20:,.0f} MiB of journal "
            f"({d['records']:,} 1 KiB appends)",
            f"{d['records_per_s']:,.0f} records/s ({d['records_per_cpu_s']:,.0f} per CPU second)",
            "",
            f"target ≥ 200,000 records/s (issue 14); serving {d['serve_s']:.1f} s after start",
        )
    ]


def write_doc(
    rows: list[tuple[str, str, str, str]],
    commands: str,
    begin: str = BEGIN,
    end: str = END,
    load: str = "",
) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    table = [
        "| measure | figure (median ± spread) | ratio to ceiling | target / note |",
        "|---|---|---|---|",
    ]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    block = "\n".join(
        [
            begin,
            f"Measured {now} on {os.cpu_count()} cores ({cpu}), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}."
            + (f" {load}" if load else ""),
            "",
            *table,
            "",
            "Produced by:",
            "",
            "```",
            commands,
            "```",
            end,
        ]
    )
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    DOC.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    p.add_argument(
        "--only",
        default=None,
        choices=[
            "http",
            "scale",
            "fanout",
            "idle",
            "memory",
            "snapshot",
            "journal",
            "replay",
            "icount",
            "redis",
        ],
    )
    p.add_argument(
        "--replay-mib", type=int, default=1024, help="journal size for the replay run (MiB)"
    )
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.quick:
        args.rounds, args.seconds = 1, 2
    # Thousands of streams need thousands of descriptors, here and in the relay.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[tuple[str, str, str, str]] = []
    if args.only in (None, "http"):
        rows += bench_publish_and_read(args.rounds, args.seconds)
    if args.only in (None, "scale"):
        rows += bench_batch_ws_scale(args.rounds, args.seconds)
    if args.only in (None, "icount"):
        rows += bench_icount()
    if args.only in (None, "fanout"):
        rows += bench_fanout(200, 20, 10 if not args.quick else 4)
        rows += bench_fanout(1000, 20, 10 if not args.quick else 4)
    if args.only in (None, "idle"):
        rows += bench_idle_sse(5000)
        rows += bench_idle_sse(10_000)
    if args.only in (None, "memory"):
        rows += bench_memory(50_000)
    if args.only in (None, "snapshot"):
        rows += bench_snapshot(50_000)
    journal_rows: list[tuple[str, str, str, str]] = []
    load_before = os.getloadavg()[0]
    if args.only in (None, "journal"):
        journal_rows += bench_journal(args.rounds, args.seconds)
    if args.only in (None, "journal", "replay"):
        journal_rows += bench_replay(args.replay_mib if not args.quick else 64)
    load = f"Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
    if args.only in (None, "redis") and shutil.which("redis-server"):
        rows += bench_redis()
    for r in rows + journal_rows:
        print(" | ".join(r))
    cmd = "make bench   # = .venv/bin/python bench/run.py " + " ".join(sys.argv[1:])
    if rows:
        write_doc(rows, cmd.strip())
    if journal_rows:
        write_doc(journal_rows, cmd.strip(), JOURNAL_BEGIN, JOURNAL_END, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
