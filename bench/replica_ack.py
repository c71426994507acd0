"""The cost of HIVE_RELAY_REDIS_MIN_REPLICAS=1 on the publish rate.

    .venv/bin/python bench/replica_ack.py [--posts 3000]

One run, one machine: a private primary and replica (redis-server, no AOF so the
difference is the WAIT round trip to the replica, not the disk), one relay
subprocess per setting, the same load client as bench/redis_vs_memory.py.
Figures are for comparison within the run only.
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
        for n in (0, 1):
            env = {**ENV, "HIVE_RELAY_STORE": primary.url, "HIVE_RELAY_REDIS_MIN_REPLICAS": str(n)}
            with RelayProcess(env=env) as relay:
                rate = asyncio.run(publish_rate(relay.url, args.posts, args.conns))
            print(f"MIN_REPLICAS={n}: {rate:,.0f} publishes/s")


if __name__ == "__main__":
    main()
