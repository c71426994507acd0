"""bench/herd.py runs against a real relay and its accounting is right.

Not a threshold test: a few followers, one second of publishing, and the check
that every follower got every envelope once, in order, by both paths (nudge +
GET after cursor, and SSE bodies), with the CPU figures read from /proc. The
pure helpers (the /proc/<pid>/stat parser, the tally, the SSE splitter, the
shares) are checked on their own, including the cases they must reject.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import herd  # noqa: E402


def test_stat_parser_counts_fields_after_the_command_name() -> None:
    # A command name may hold spaces and ")"; utime and stime are fields 14 and 15.
    fields = " ".join(str(i) for i in range(3, 14)) + " 250 150 " + " ".join(["0"] * 30)
    stat = b"4242 (odd ) name) S " + fields.encode()[2:]  # field 3 is the state letter
    assert herd.parse_stat_cpu(stat) == (250 + 150) / herd.CLK_TCK
    own = herd.cpu_seconds(os.getpid())
    assert own > 0
    assert own <= sum(os.times()[:2]) + 0.05  # the kernel's figure for this process


def test_tally_rejects_a_missing_a_duplicated_or_a_reordered_row() -> None:
    seqs = [10, 20, 30]
    whole = herd.Tally()
    for s in seqs:
        whole.add(s)
    assert whole.complete(len(seqs), sum(seqs))

    missing = herd.Tally()
    for s in seqs[:2]:
        missing.add(s)
    assert not missing.complete(len(seqs), sum(seqs))

    twice = herd.Tally()
    for s in [10, 20, 20]:  # same count as three rows, wrong content
        twice.add(s)
    assert twice.disorder == 1
    assert not twice.complete(len(seqs), sum(seqs))

    swapped = herd.Tally()
    for s in [10, 30, 20]:  # every row, once, but out of order
        swapped.add(s)
    assert swapped.disorder == 1
    assert not swapped.complete(len(seqs), sum(seqs))


def test_sse_splitter_joins_events_split_across_chunks() -> None:
    sp = herd.SSESplitter()
    stream = b': connected\n\ndata: {"seq":1}\n\nid: 2\ndata: {"seq":2,\ndata: "body":{}}\n\n'
    out: list[bytes] = []
    for i in range(0, len(stream), 7):  # chunk boundaries fall inside lines and events
        out += sp.feed(stream[i : i + 7])
    assert out == [b'{"seq":1}', b'{"seq":2,\n"body":{}}']
    assert sp.buf == b""


def test_split_gives_every_follower_to_exactly_one_generator() -> None:
    for n, parts in [(1, 4), (7, 3), (200, 4), (1000, 16)]:
        shares = herd.split(n, parts)
        indices = [first + k for first, count in shares for k in range(count)]
        assert indices == list(range(n))
        assert max(c for _, c in shares) - min(c for _, c in shares) <= 1
    assert len({herd.source_address(i) for i in range(1000)}) == 1000
    assert all(not a.endswith((".0", ".255")) for a in map(herd.source_address, range(1000)))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert herd.percentile(values, 50) == 50.0
    assert herd.percentile(values, 99) == 99.0
    assert herd.percentile([3.0], 99) == 3.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nudge", "sse"])
def test_herd_delivers_every_envelope_to_every_follower_once(mode: str) -> None:
    followers = 5
    with RelayProcess(env={}) as relay:  # the relay's defaults, as the benchmark runs it
        assert relay.proc is not None
        res = subprocess.run(
            [sys.executable, str(BENCH / "herd.py"), "--url", relay.url,
             "--relay-pid", str(relay.proc.pid), "--followers", str(followers),
             "--mode", mode, "--procs", "2", "--seconds", "1", "--rate", "20"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["mode"] == mode
    assert out["sent"] >= 10
    assert out["expected"] == out["sent"] * followers
    assert out["delivered"] == out["expected"]
    assert out["complete"] and out["complete_followers"] == followers
    assert out["disorder"] == 0
    assert out["errors"] == []
    if mode == "nudge":
        # At least one read per follower, at most one per row per follower.
        assert followers <= out["gets"] <= out["delivered"]
    else:
        assert out["gets"] == 0
    assert len(out["generator_cpu_s"]) == 2
    assert out["relay_cpu_s"] > 0
    assert out["relay_cpu_per_1000"] == pytest.approx(out["relay_cpu_s"] / out["delivered"] * 1000)
    assert out["generators_below_relay"] == (out["generator_cpu_max_s"] < out["relay_cpu_s"])
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
