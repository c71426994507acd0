"""The read lane against its ceiling, in one run: issue 13's read figures.

Starts the prebuilt-bytes Starlette ceiling (bench/ceiling.py), a relay with the
default settings (access log on, written to a file as a service manager would
take it) and a relay with the access log off, and measures in interleaved rounds
(so a slow minute on the shared machine moves every figure of a round):

* newest 5 rows of a 1,000-row backlog (the read every device makes after a nudge),
* catch-up: 5,000 rows from cursor 0, the same read repeated (cached after the first),
* catch-up with a new cursor on every request (bench/get_cursors.lua: the page
  cache cannot serve one; this is a device's first catch-up),

each against the ceiling serving a prebuilt answer of the same size. Ratios are the
median of per-round ratios.

    .venv/bin/python bench/read_lane.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from run import Ceiling, fill, median_spread, paired, wrk  # noqa: E402

from tests.relayproc import RelayProcess  # noqa: E402

ENV = {
    "HIVE_RELAY_PUSH_RATE": "0",
    "HIVE_RELAY_MAX_SSE": "0",
    "HIVE_RELAY_MAX_SSE_PER_CLIENT": "0",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--skip-cold", action="store_true", help="skip the uncached catch-up")
    a = p.parse_args()
    names = ["ceil5", "on5", "off5", "ceilC", "onC", "offC", "onCold", "offCold"]
    got: dict[str, list[float]] = {n: [] for n in names}
    with (
        Ceiling() as ceiling,
        RelayProcess(env=ENV) as on,
        RelayProcess(env={**ENV, "HIVE_RELAY_ACCESS_LOG": "false"}) as off,
    ):
        small: dict[str, str] = {}
        for r in (on, off):
            seqs = fill(r.url, "r1k", 1_000)
            fill(r.url, "catchup", 6_000)
            # Seqs are append times, so each relay's newest-5 cursor is its own.
            small[r.url] = f"/v1/workspaces/r1k/envelopes?after={seqs[-6]}&limit=5"
        big = "/v1/workspaces/catchup/envelopes?after=0&limit=5000"
        size5 = len(httpx.get(on.url + small[on.url]).content)
        sizec = len(httpx.get(on.url + big, timeout=30).content)
        cold = {"WS": "catchup", "LIMIT": "5000"}
        for _ in range(a.rounds):
            got["ceil5"].append(wrk(ceiling.url + f"/read?size={size5}", a.seconds, 32))
            got["on5"].append(wrk(on.url + small[on.url], a.seconds, 32))
            got["off5"].append(wrk(off.url + small[off.url], a.seconds, 32))
            got["ceilC"].append(wrk(ceiling.url + f"/read?size={sizec}", a.seconds, 8))
            got["onC"].append(wrk(on.url + big, a.seconds, 8))
            got["offC"].append(wrk(off.url + big, a.seconds, 8))
            if not a.skip_cold:
                got["onCold"].append(wrk(on.url + "/", a.seconds, 8, "get_cursors.lua", cold))
                got["offCold"].append(wrk(off.url + "/", a.seconds, 8, "get_cursors.lua", cold))
        lines = on.logs().count("relay.access request")
    print(
        f"load average {os.getloadavg()[0]:.1f}; "
        f"access lines logged by the default relay: {lines:,}"
    )
    print(f"page sizes: 5 rows {size5:,} B, 5,000 rows {sizec:,} B")

    def row(label: str, key: str, ceil: str, extra: str = "") -> None:
        if not got[key]:
            return
        med, spread = median_spread(got[key])
        ratio = paired(got[key], got[ceil]) if key != ceil else 1.0
        print(f"{label:<52} {med:>10,.0f} req/s ±{spread:>3.0f}%  {ratio:.2f}  {extra}")

    row("ceiling, prebuilt bytes of a 5-row page", "ceil5", "ceil5")
    row("newest 5 rows, defaults (log on)", "on5", "ceil5")
    row(
        "newest 5 rows, log off",
        "off5",
        "ceil5",
        f"log on/off {paired(got['on5'], got['off5']):.2f}",
    )
    row("ceiling, prebuilt bytes of 5,000 rows", "ceilC", "ceilC")
    row("catch-up 5,000 rows from 0, defaults", "onC", "ceilC")
    row("catch-up 5,000 rows from 0, log off", "offC", "ceilC")
    row("catch-up 5,000 rows, new cursors (uncached), defaults", "onCold", "ceilC")
    row("catch-up 5,000 rows, new cursors (uncached), log off", "offCold", "ceilC")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
