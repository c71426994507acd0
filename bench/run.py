"""`make bench`: the relay next to its ceiling, in one run, on this machine.

Every figure is the median of several runs with its spread, and is shown as a
ratio to the ceiling measured in the same run (machines here are shared and
noisy: ratios travel, absolute numbers do not). The relays run with their
default settings (access log on), with the access log off beside them for the
main figures. Load generators are separate processes: wrk for plain HTTP,
bench/herd.py (several asyncio processes) for followers, bench/fanout.py for
idle streams.

    .venv/bin/python bench/run.py [--quick] [--all] [--only GROUP ...]

Writes each group's table into docs/benchmarks.md between its markers.
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
from collections.abc import Callable
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from herd import cpu_seconds  # noqa: E402

from tests.relayproc import RelayProcess, free_port  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"


def wrk(
    url: str, seconds: int, conns: int, script: str | None = None, env: dict[str, str] | None = None
) -> float:
    return wrk_full(url, seconds, conns, script, env)[0]


def wrk_full(
    url: str, seconds: int, conns: int, script: str | None = None, env: dict[str, str] | None = None
) -> tuple[float, int]:
    """(requests per second, requests completed) of one wrk run."""
    cmd = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", str(HERE / script)]
    res = subprocess.run(
        [*cmd, url], capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    if res.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} {url} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
        )
    out = res.stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rate, int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


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
    """The relay's default settings, but for the one a benchmark cannot run under.

    The per-client push rate (100/s by default) would cap a load generator that
    publishes from one address, so it is off; everything else, the access log
    among it, is the default unless a run says otherwise (`extra`). The relay's
    output, its access log included, goes to a file (tests/relayproc.py), as it
    would to journald or a log file in production.
    """
    return {"HIVE_RELAY_PUSH_RATE": "0", **extra}


LOG_OFF = {"HIVE_RELAY_ACCESS_LOG": "false"}


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


def log_cost(on: list[float], off: list[float], cpu_on: list[float], cpu_off: list[float]) -> str:
    """The access log's cost: time per request with it on over time with it off, less 1
    (the rate off over the rate on, paired per round), as a percentage; and the same
    for the relay's CPU time per request."""
    return (
        f"{(paired(off, on) - 1) * 100:+.0f}% by rate, "
        f"{(paired(cpu_on, cpu_off) - 1) * 100:+.0f}% by CPU"
    )


# The uncached catch-up: every request a cursor no request had before (below the
# first seq, so each answers the first 5,000 rows), so the page cache never serves one.
COLD = {"WS": "r50k", "LIMIT": "5000"}


def bench_publish_and_read(rounds: int, seconds: int) -> list[tuple[str, str, str, str]]:
    """Issue 13's main figures: the defaults (access log on) and the access log off,
    each against the prebuilt-bytes Starlette ceiling of the same round."""
    rows: list[tuple[str, str, str, str]] = []
    with (
        Ceiling() as ceiling,
        RelayProcess(env=relay_env()) as on,
        RelayProcess(env=relay_env(**LOG_OFF)) as off,
    ):
        relays = {"on": on, "off": off}
        read5: dict[str, str] = {}
        for name, relay in relays.items():
            fill(relay.url, "pub", 50_000)  # at its 50,000 retention cap from the start
            seqs_1k = fill(relay.url, "r1k", 1_000)
            seqs_50k = fill(relay.url, "r50k", 50_000)
            read5[name] = f"?after={seqs_1k[-6]}&limit=5"
            read5[name + "50k"] = f"?after={seqs_50k[-6]}&limit=5"
        page5 = len(httpx.get(on.url + "/v1/workspaces/r1k/envelopes" + read5["on"]).content)
        catch_path = "/v1/workspaces/r50k/envelopes?after=0&limit=5000"
        catch_size = len(httpx.get(on.url + catch_path, timeout=30).content)
        runs: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}  # the server's CPU microseconds per request
        pids = {ceiling.url: ceiling.proc.pid}
        pids.update({r.url: r.proc.pid for r in relays.values() if r.proc is not None})

        def run(
            key: str,
            url: str,
            conns: int,
            script: str | None = None,
            env: dict[str, str] | None = None,
        ) -> None:
            # The server's own CPU time per request, from /proc: on a machine whose
            # cores other work takes, it moves far less than the rate does.
            pid = next(p for base, p in pids.items() if url.startswith(base + "/"))
            before = cpu_seconds(pid)
            rate, requests = wrk_full(url, seconds, conns, script, env)
            runs.setdefault(key, []).append(rate)
            cpu.setdefault(key, []).append((cpu_seconds(pid) - before) / requests * 1e6)

        for r in range(rounds):  # each round's figures back to back, so they share its minute
            # Log on and log off take turns going first: the relay measured right after the
            # ceiling paid about 10 % more CPU per read whichever it was (docs/benchmarks.md).
            turn = list(relays.items()) if r % 2 == 0 else list(relays.items())[::-1]
            run("ceil_pub", ceiling.url + "/append", 32, "post_unique.lua")
            for name, relay in turn:
                run(
                    f"pub_{name}", relay.url + "/v1/workspaces/pub/envelopes", 32, "post_unique.lua"
                )
            run("ceil_read", ceiling.url + f"/read?size={page5}", 32)
            for name, relay in turn:
                run(f"read_{name}", relay.url + "/v1/workspaces/r1k/envelopes" + read5[name], 32)
            run("read_on_50k", on.url + "/v1/workspaces/r50k/envelopes" + read5["on50k"], 32)
            run("ceil_catch", ceiling.url + f"/read?size={catch_size}", 8)
            for name, relay in turn:
                run(f"catch_{name}", relay.url + catch_path, 8)
            for name, relay in relays.items():
                run(f"cold_{name}", relay.url + "/", 8, "get_cursors.lua", COLD)

    def fig(key: str) -> str:
        med, spread = median_spread(runs[key])
        return f"{med:,.0f} req/s ±{spread:.0f}%, {statistics.median(cpu[key]):.0f} µs CPU"

    def ratio(key: str, ceil: str) -> str:
        return f"{paired(runs[key], runs[ceil]):.2f} (CPU {paired(cpu[ceil], cpu[key]):.2f})"

    for what, key, ceil, ceil_what, target in (
        ("Unique 1 KiB publish at the 50,000 cap", "pub", "ceil_pub",
         "append body to a list (POST)", "≥ 0.8 (issue 7)"),
        ("Newest 5 rows of a 1,000 backlog", "read", "ceil_read",
         "prebuilt bytes, size of a 5-row page", "≥ 1.0 (issue 13)"),
        ("Catch-up, 5,000 rows from cursor 0", "catch", "ceil_catch",
         "prebuilt bytes, size of 5,000 rows", "≥ 0.9 (issue 13)"),
    ):  # fmt: skip
        rows += [
            (f"Ceiling: {ceil_what}", fig(ceil), "1.00", ""),
            (f"{what}, defaults (access log on)", fig(f"{key}_on"), ratio(f"{key}_on", ceil),
             target),
            (f"{what}, access log off", fig(f"{key}_off"), ratio(f"{key}_off", ceil), ""),
            (f"Access log cost, {what[0].lower()}{what[1:]}", log_cost(runs[f"{key}_on"],
             runs[f"{key}_off"], cpu[f"{key}_on"], cpu[f"{key}_off"]), "",
             "time per request, on against off"
             + ("; target ≤ +10% (issue 13)" if key == "read" else "")),
        ]  # fmt: skip
        if key == "catch":
            rows += [
                ("Catch-up, 5,000 rows, a new cursor each request (uncached), defaults",
                 fig("cold_on"), ratio("cold_on", ceil),
                 "a device's first catch-up; ≥ 0.9 (issue 13)"),
                ("Catch-up, 5,000 rows, a new cursor each request (uncached), access log off",
                 fig("cold_off"), ratio("cold_off", ceil), ""),
            ]  # fmt: skip
        if key == "read":
            rows.append(
                (
                    "Newest 5 rows of a 50,000 backlog, defaults",
                    fig("read_on_50k"),
                    ratio("read_on_50k", ceil),
                    f"50,000 / 1,000 backlog = {paired(runs['read_on_50k'], runs['read_on']):.2f}"
                    f" (CPU {paired(cpu['read_on'], cpu['read_on_50k']):.2f}; flat: ≥ 0.85)",
                )
            )
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
        seqs = {n: fill(relay.url, f"backlog{n}", n) for n in (1_000, 10_000, 50_000)}
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


def run_herd(
    relay: RelayProcess, followers: int, mode: str, seconds: float, profile: Path | None = None
) -> dict:
    assert relay.proc is not None
    cmd = [
        sys.executable,
        str(HERE / "herd.py"),
        "--url",
        relay.url,
        "--relay-pid",
        str(relay.proc.pid),
        "--followers",
        str(followers),
        "--mode",
        mode,
        "--rate",
        "20",
        "--seconds",
        str(seconds),
    ]
    if profile is not None:
        cmd += ["--py-spy", str(profile)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300, check=False)
    if res.returncode:
        raise RuntimeError(f"herd.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def bench_herd(
    sizes: tuple[int, ...], seconds: float, rounds: int, profile_dir: Path | None = None
) -> list[tuple[str, ...]]:
    """The Hive desktop path (nudge + GET after cursor) next to SSE bodies, N followers of
    one workspace at 20 env/s. The relay runs with its defaults: 1,000 followers fit the
    default stream cap (2,000), and each follower has its own loopback address, so the
    per-client cap (100) applies per follower as it does per device."""
    rows: list[tuple[str, ...]] = []
    for n in sizes:
        results: dict[str, list[dict]] = {"nudge": [], "sse": []}
        with RelayProcess(env={}) as relay:
            for _ in range(rounds):
                for mode, runs in results.items():  # interleaved: a round's pair shares its minute
                    runs.append(run_herd(relay, n, mode, seconds))
            if profile_dir is not None:  # one more run, not counted: py-spy takes a core
                profile_dir.mkdir(parents=True, exist_ok=True)
                run_herd(relay, n, "nudge", seconds, profile_dir / f"herd-{n}-nudge.txt")
        per = {m: statistics.median(d["relay_cpu_per_1000"] for d in v) for m, v in results.items()}
        for mode, runs in results.items():
            d = sorted(runs, key=lambda x: x["p99_ms"])[len(runs) // 2]  # the median run
            p50 = statistics.median(x["p50_ms"] for x in runs)
            p99 = statistics.median(x["p99_ms"] for x in runs)
            complete = all(x["complete"] for x in runs)
            each_below = all(x["generators_below_relay"] for x in runs)
            together = sum(d["generator_cpu_s"])
            target = "" if mode == "sse" else "≤ 2x" + ("; p99 < 100 ms" if n == 200 else "")
            rows.append(
                (
                    f"{n:,}",
                    "nudge + GET after cursor" if mode == "nudge" else "SSE bodies",
                    f"{statistics.median(x['sent_per_s'] for x in runs):.1f}",
                    f"{p50:.1f} / {p99:.1f}",
                    f"{per[mode]:.2f}",
                    f"{per[mode] / per['sse']:.2f}x",
                    f"{d['relay_cpu_s']:.1f}",
                    f"{d['generator_cpu_max_s']:.1f} ({len(d['generator_cpu_s'])} procs, "
                    f"{together:.1f} together; publisher {d['publisher_cpu_s']:.1f})",
                    ("yes" if each_below else "**NO: a generator set the pace**")
                    + ("" if together < d["relay_cpu_s"] else "; together above the relay"),
                    f"{'yes' if complete else '**NO**'} ({d['delivered']:,}/{d['expected']:,}"
                    + (f", {d['gets']:,} GETs)" if mode == "nudge" else ")"),
                    target,
                )
            )
    return rows


HERD_HEADER = (
    "followers",
    "path",
    "env/s sent (asked: 20)",
    "p50 / p99 publish → body in hand (ms)",
    "relay CPU s per 1,000 deliveries",
    "to SSE bodies",
    "relay CPU s",
    "busiest generator CPU s",
    "each generator below the relay",
    "every envelope to every follower once (within 15 s of the last publish)",
    "target (issue 13)",
)


def bench_workers(rounds: int, seconds: int) -> list[tuple[str, str, str, str]]:
    """Publish and read rates of one relay on a private Redis with 1 and 2 workers."""
    from redis_vs_memory import Redis

    runs: dict[tuple[int, str], list[float]] = {}
    with Redis() as redis:
        relays = {
            n: RelayProcess(env=relay_env(HIVE_RELAY_STORE=redis.url, HIVE_RELAY_WORKERS=str(n)))
            for n in (1, 2)
        }
        try:
            read = {}
            for n, relay in relays.items():
                relay.start()
                seqs = fill(relay.url, f"w{n}read", 1_000)
                read[n] = f"/v1/workspaces/w{n}read/envelopes?after={seqs[-6]}&limit=5"
            for _ in range(rounds):
                for n, relay in relays.items():
                    pub = relay.url + f"/v1/workspaces/w{n}pub/envelopes"
                    runs.setdefault((n, "pub"), []).append(wrk(pub, seconds, 32, "post_unique.lua"))
                    runs.setdefault((n, "read"), []).append(wrk(relay.url + read[n], seconds, 32))
        finally:
            for relay in relays.values():
                if relay.proc is not None:
                    relay.stop()
    rows = []
    for what, key in (("Unique 1 KiB publish", "pub"), ("Newest 5 rows of 1,000", "read")):
        for n in (1, 2):
            med, spread = median_spread(runs[(n, key)])
            rows.append(
                (
                    f"Redis store, {what}, HIVE_RELAY_WORKERS={n}",
                    f"{med:,.0f} req/s ±{spread:.0f}%",
                    "",
                    "" if n == 1 else f"{paired(runs[(2, key)], runs[(1, key)]):.2f}x one worker",
                )
            )
    return rows


def bench_idle_sse(connections: int) -> list[tuple[str, str, str, str]]:
    # Stream caps off: one holder process opens every stream from one address.
    caps_off = {"HIVE_RELAY_MAX_SSE": "0", "HIVE_RELAY_MAX_SSE_PER_CLIENT": "0"}
    with RelayProcess(env=relay_env(**caps_off)) as relay:
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


MAIN_HEADER = ("measure", "figure (median ± spread)", "ratio to ceiling", "target / note")
# The main table's ratio column: the rate ratio, and in brackets the ceiling's CPU time
# per request over the relay's (both from /proc), which a busy machine moves far less.


def write_doc(
    rows: list[tuple[str, ...]],
    commands: str,
    begin: str,
    end: str,
    load: str = "",
    header: tuple[str, ...] = MAIN_HEADER,
) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
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


# Each group of figures has its own table in docs/benchmarks.md, between its markers,
# so that `--only GROUP` rewrites that table and leaves the others as they were.
GROUPS = {
    "http": "RESULTS",
    "herd": "HERD",
    "workers": "WORKERS",
    "scale": "MORE",
    "icount": "ICOUNT",
    "idle": "MORE",
    "memory": "MORE",
    "snapshot": "MORE",
    "redis": "MORE",
    "journal": "JOURNAL",
    "replay": "REPLAY",
}
# Left out of a plain `make bench` (minutes each): run them with --all or --only.
SLOW = {"icount", "replay"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="one short round of each")
    p.add_argument("--all", action="store_true", help="also callgrind and the 1 GiB replay")
    p.add_argument("--only", action="append", choices=sorted(GROUPS), help="(repeatable)")
    p.add_argument("--no-write", action="store_true", help="print the rows, leave the docs alone")
    p.add_argument("--herd-seconds", type=float, default=10, help="publishing time per herd run")
    p.add_argument("--herd-rounds", type=int, default=1, help="herd runs per size and path")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy profiles of the relay during the herd (nudge + GET) into this folder",
    )
    p.add_argument(
        "--replay-mib", type=int, default=1024, help="journal size for the replay run (MiB)"
    )
    args = p.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    if args.quick:
        args.rounds, args.seconds, args.herd_seconds = 1, 2, 4
    only = set(args.only or (GROUPS if args.all else set(GROUPS) - SLOW))
    # Thousands of streams need thousands of descriptors, here and in the relay (its
    # children inherit the limit): 1,000 nudge followers hold 2,000 connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tables: dict[str, list[tuple[str, ...]]] = {}
    timings: list[str] = []
    load_before = os.getloadavg()[0]

    def section(name: str, fn: Callable[[], list[tuple[str, ...]]]) -> None:
        if name not in only:
            return
        if name == "redis" and shutil.which("redis-server") is None:
            print("skipping redis: redis-server is not installed", file=sys.stderr)
            return
        start = time.monotonic()
        rows = fn()
        took = time.monotonic() - start
        timings.append(f"{name} {took:.0f} s")
        print(f"[{name}: {took:.0f} s]", file=sys.stderr, flush=True)
        for r in rows:
            print(" | ".join(r), flush=True)
        tables.setdefault(GROUPS[name], []).extend(rows)

    rounds, secs = args.rounds, args.seconds
    section("http", lambda: bench_publish_and_read(rounds, secs))
    section(
        "herd", lambda: bench_herd((200, 1000), args.herd_seconds, args.herd_rounds, args.profile)
    )
    section("workers", lambda: bench_workers(rounds, secs))
    section("scale", lambda: bench_batch_ws_scale(rounds, secs))
    section("icount", bench_icount)
    section("idle", lambda: bench_idle_sse(5000) + bench_idle_sse(10_000))
    section("memory", lambda: bench_memory(50_000))
    section("snapshot", lambda: bench_snapshot(50_000))
    section("redis", bench_redis)
    section("journal", lambda: bench_journal(rounds, secs))
    section("replay", lambda: bench_replay(args.replay_mib if not args.quick else 64))
    load = f"Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."
    load += " Took " + ", ".join(timings) + "."
    cmd = ("make bench   # = .venv/bin/python bench/run.py " + " ".join(sys.argv[1:])).strip()
    for group, rows in tables.items() if not args.no_write else ():
        header = HERD_HEADER if group == "HERD" else MAIN_HEADER
        write_doc(rows, cmd, f"<!-- {group}:BEGIN -->", f"<!-- {group}:END -->", load, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
