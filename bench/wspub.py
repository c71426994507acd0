"""WebSocket publish load: a few sockets, each with many `pub` frames in flight.

Prints JSON: {"acks": N, "seconds": S, "rate": N/S}. A separate process from the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import websockets


async def one_socket(url: str, seconds: float, window: int, tag: int) -> int:
    template = '{"op":"pub","body":{"n":"%d-%d","p":"' + "w" * 980 + '"}}'
    acks = 0
    sent = 0
    async with websockets.connect(url, max_queue=None) as sock:
        deadline = time.monotonic() + seconds

        async def sender() -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                while sent - acks < window:
                    # A template, not json.dumps: the load generator must not be the
                    # bottleneck it measures.
                    await sock.send(template % (tag, sent))
                    sent += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(sender())
        while time.monotonic() < deadline or acks < sent:
            frame = await asyncio.wait_for(sock.recv(), 30)
            if frame.startswith('{"op":"ack"'):
                acks += 1
            else:
                raise RuntimeError(frame)
            if time.monotonic() >= deadline and task.done() and acks >= sent:
                break
        await task
    return acks


async def main(url: str, sockets: int, seconds: float, window: int) -> dict:
    start = time.monotonic()
    counts = await asyncio.gather(*(one_socket(url, seconds, window, i) for i in range(sockets)))
    took = time.monotonic() - start
    return {"acks": sum(counts), "seconds": took, "rate": sum(counts) / took}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--sockets", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--window", type=int, default=256)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(main(a.url, a.sockets, a.seconds, a.window))))
