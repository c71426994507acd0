"""The cost of HIVE_RELAY_REDIS_MIN_REPLICAS=1 on the publish rate.

    .venv/bin/python bench/replica_ack.py [--posts 3000]

One run, one machine: a private primary and replica (redis-server, no AOF so the
difference is the WAIT round trip to the replica, not the disk), one relay
subprocess per setting, the same load client as bench/redis_vs_memory.py.
Figures are for comparison within the run only. Beside the rate it counts what
each publish asked of Redis (INFO commandstats on the primary, reset before each
setting): with MIN_REPLICAS=0 one EVALSHA (the append script, which publishes
inside); with MIN_REPLICAS=1 the pipelined EVALSHA + WAIT, then the commit
script that publishes once WAIT counted the replica (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.redis_vs_memory import ENV, publish_rate  # noqa: E402
from tests.redisproc import RedisServer  # noqa: E402
from tests.relayproc import RelayProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    with RedisServer() as primary, RedisServer(replica_of=primary.port) as replica:
        client = replica.client()
        while client.info("replication").get("master_link_status") != "up":
            time.sleep(0.05)
        client.close()
        stats = primary.client()
        for n in (0, 1):
            env = {**ENV, "HIVE_RELAY_STORE": primary.url, "HIVE_RELAY_REDIS_MIN_REPLICAS": str(n)}
            with RelayProcess(env=env) as relay:
                stats.config_resetstat()
                rate = asyncio.run(publish_rate(relay.url, args.posts, args.conns))
                calls = per_publish(stats.info("commandstats"), args.posts)
            print(f"MIN_REPLICAS={n}: {rate:,.0f} publishes/s; per publish: {calls}")
        stats.close()


def per_publish(info: dict[str, dict[str, int]], posts: int) -> str:
    """Script runs and WAITs per publish (the commands scripts run inside are left out)."""
    wanted = ("evalsha", "wait")
    out = []
    for name in wanted:
        calls = info.get(f"cmdstat_{name}", {}).get("calls", 0)
        out.append(f"{name} {calls / posts:.2f}")
    return ", ".join(out)


if __name__ == "__main__":
    main()
