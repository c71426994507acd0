"""Replay speed and time to serve after a crash, with a journal of a given size.

Builds a data directory whose journal holds `--mib` MiB of single-envelope
append records (bodies of `--body` bytes, spread over workspaces below the
per-workspace cap), written through the store's own journal in-process and
never checkpointed, and left without a clean-stop marker, as a kill -9 leaves
it. Then starts a real relay process on it and reports, as JSON: the records
replayed and the replay time the relay logs, and the time from process start
until /v1/health answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from relay.store.base import Bounds  # noqa: E402
from relay.store.journal import list_segments  # noqa: E402
from relay.store.memory import MemoryStore  # noqa: E402
from relay.store.snapshot import JournalConfig, Snapshotter  # noqa: E402
from tests.relayproc import RelayProcess  # noqa: E402

PER_WORKSPACE = 40_000


async def build(data: Path, mib: int, body_size: int) -> int:
    store = MemoryStore(Bounds(max_bytes=1 << 40))
    snap = Snapshotter(store, str(data), 86400, JournalConfig(mode="off"))
    snap.restore()
    await store.start()
    assert snap.journal is not None
    journal = snap.journal
    pad = b"p" * (body_size - 30)
    n = 0
    while journal.total_bytes < mib << 20:
        ws = f"w{n // PER_WORKSPACE}"
        # No await per append: hand records over in bulk, as many publishers would.
        futs = [
            store.append(ws, b'{"n":%d,"p":"%s"}' % (n + i, pad), b"k%d" % (n + i))
            for i in range(1000)
        ]
        await asyncio.gather(*futs)
        n += 1000
    await journal.close(clean=False)  # everything on disk, no clean marker: a crash
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--body", type=int, default=1024)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="journal-replay-"))
    try:
        data = tmp / "data"
        built = asyncio.run(build(data, args.mib, args.body))
        size = sum(path.stat().st_size for _, path in list_segments(data))
        relay = RelayProcess(
            env={"HIVE_RELAY_DATA_DIR": str(data), "HIVE_RELAY_ACCESS_LOG": "false"},
            wait=False,
            startup_timeout=600,
        )
        started = time.monotonic()
        relay.start()
        while True:
            try:
                if httpx.get(relay.url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert relay.proc is not None and relay.proc.poll() is None, relay.logs()
            time.sleep(0.02)
        serve_s = time.monotonic() - started
        # The relay's user and system CPU until it served (start-up included): the
        # system part is mostly the kernel faulting in and zeroing fresh pages for
        # the rows, which on this (virtual) machine costs from run to run anywhere
        # between a fifth and twice the user part.
        fields = Path(f"/proc/{relay.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        user_s, sys_s = int(fields[11]) / tick, int(fields[12]) / tick
        log = relay.logs()
        relay.stop(9)
        m = re.search(
            r"replayed (\d+) journal records from \d+ segments in ([\d.]+) s \(([\d.]+) s of CPU",
            log,
        )
        assert m, log
        records, replay_s, cpu_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
        print(
            json.dumps(
                {
                    "appends": built,
                    "journal_bytes": size,
                    "records": records,
                    "replay_s": replay_s,
                    "records_per_s": records / replay_s if replay_s else 0,
                    "cpu_s": cpu_s,
                    "records_per_cpu_s": records / cpu_s if cpu_s else 0,
                    "serve_s": serve_s,
                    "serve_user_s": user_s,
                    "serve_sys_s": sys_s,
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
