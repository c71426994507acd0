"""Replica-acknowledged writes: WAIT on the connection that ran the write.

`WAIT n timeout` counts replicas that hold every write the *sending connection*
made, so the write and its WAIT go down one socket: a pipeline of the two
(`run_acked`). A write that changed nothing (a retried append whose envelopes
are all stored already) leaves that connection's replication offset behind the
original write, so `wait_after_probe` first makes a harmless propagated write
(PUBLISH on a channel nobody listens to) and waits behind that: the stream of
writes to replicas is ordered, so the original write is covered too.

Both take a client and the count, so a Cluster store can run them on a client of
the node that owns the workspace's slot (`asking`: after an ASK redirection, the
pipeline starts with ASKING). In a Cluster, PUBLISH and SPUBLISH travel on the
cluster bus, not in the replication stream, so there the probe is a short-lived
key in the workspace's slot instead (`probe_key`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rx

from relay.store.base import StoreUnavailable
from relay.store.redis import scripts

LOG = logging.getLogger("relay.store.redis")

RETRY_AFTER = 1  # seconds: a replica that fell behind usually catches up in less


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    """How many replicas must hold a write (0 = none asked), and how long to wait."""

    count: int = 0
    wait_ms: int = 500

    def check(self, acked: int) -> None:
        """StoreUnavailable (503, Retry-After) when fewer than `count` replicas hold it."""
        if acked < self.count:
            LOG.warning(
                "a write reached %d of %d Redis replicas within %d ms; answering 503",
                acked,
                self.count,
                self.wait_ms,
            )
            raise StoreUnavailable(
                f"the write reached {acked} of the {self.count} replicas required in time; "
                "retry it with the same idempotency key",
                retry_after=RETRY_AFTER,
            )


async def run_acked(
    redis: Any,
    name: str,
    keys: list[str],
    args: list[Any],
    ack: ReplicaAck,
    *,
    asking: bool = False,
) -> Any:
    """EVALSHA the script and, with `ack.count` > 0, WAIT on the same connection.

    Raises StoreUnavailable when too few replicas acknowledged; the reply is then
    lost to the caller, so scripts run this way must be safe to retry (the append
    dedups by idempotency key).
    """
    if ack.count <= 0 and not asking:
        return await scripts.run(redis, name, keys, args)
    for attempt in (0, 1):
        try:
            async with redis.pipeline(transaction=False) as pipe:
                if asking:
                    pipe.execute_command("ASKING")
                pipe.evalsha(scripts.SHAS[name], len(keys), *keys, *args)
                if ack.count > 0:
                    pipe.execute_command("WAIT", ack.count, ack.wait_ms)
                out = await pipe.execute()
            break
        except rx.NoScriptError:
            if attempt:
                raise
            await redis.script_load(scripts.SCRIPTS[name])
    if asking:
        out = out[1:]
    if ack.count > 0:
        ack.check(int(out[1]))
    return out[0]


PROBE_TTL_MS = 1000  # a Cluster probe key lives this long


async def wait_after_probe(
    redis: Any,
    probe_channel: bytes,
    ack: ReplicaAck,
    *,
    probe_key: str | None = None,
    asking: bool = False,
) -> None:
    """WAIT behind a fresh propagated write, for a write made earlier on any connection."""
    if ack.count <= 0:
        return
    async with redis.pipeline(transaction=False) as pipe:
        if asking:
            pipe.execute_command("ASKING")
        if probe_key is None:
            pipe.publish(probe_channel, b"")
        else:
            pipe.set(probe_key, b"", px=PROBE_TTL_MS)
        pipe.execute_command("WAIT", ack.count, ack.wait_ms)
        out = await pipe.execute()
    ack.check(int(out[-1]))
