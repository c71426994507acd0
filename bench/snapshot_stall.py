"""How long a snapshot of 50,000 1 KiB envelopes holds the event loop.

A 1 ms ticker runs on the loop while the snapshot is written; the longest gap
between ticks is the worst stall a request could see. Prints JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from relay.store.memory import MemoryStore  # noqa: E402
from relay.store.snapshot import Snapshotter  # noqa: E402


async def main(n: int) -> dict[str, float]:
    store = MemoryStore()
    pad = b"p" * 990
    for start in range(0, n, 1000):
        bodies = [b'{"i":%d,"p":"%s"}' % (i, pad) for i in range(start, min(n, start + 1000))]
        await store.append_batch(
            "w", bodies, [b"k%d" % i for i in range(start, start + len(bodies))]
        )
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    with tempfile.TemporaryDirectory() as tmp:
        snap = Snapshotter(store, tmp, 30)
        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        gaps.clear()
        copy_start = time.perf_counter()
        store.export_state()
        copy_ms = (time.perf_counter() - copy_start) * 1000
        start = time.perf_counter()
        await snap.write(clean=False)
        total = time.perf_counter() - start
        t.cancel()
        size = (Path(tmp) / "relay.snapshot").stat().st_size
    return {
        "envelopes": n,
        "write_s": total,
        "max_stall_ms": max(gaps) * 1000,
        "copy_ms": copy_ms,
        "bytes": size,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))))
