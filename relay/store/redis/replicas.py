"""Replica-acknowledged writes: WAIT on the connection that ran the write.

`WAIT n timeout` counts replicas that hold every write the *sending connection*
made, so the write and its WAIT go down one socket: a pipeline of the two
(`run_acked`). A write that changed nothing (a retried append whose envelopes
are all stored already) leaves that connection's replication offset behind the
original write, so `wait_after_probe` first makes a harmless propagated write
(PUBLISH on a channel nobody listens to) and waits behind that: the stream of
writes to replicas is ordered, so the original write is covered too.

Both take a client or a node connection and the count, so a Cluster store can
run them on the node that owns the workspace's slot.
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
    redis: Any, name: str, keys: list[str], args: list[Any], ack: ReplicaAck
) -> Any:
    """EVALSHA the script and, with `ack.count` > 0, WAIT on the same connection.

    Raises StoreUnavailable when too few replicas acknowledged; the reply is then
    lost to the caller, so scripts run this way must be safe to retry (the append
    dedups by idempotency key).
    """
    if ack.count <= 0:
        return await scripts.run(redis, name, keys, args)
    for attempt in (0, 1):
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(scripts.SHAS[name], len(keys), *keys, *args)
                pipe.execute_command("WAIT", ack.count, ack.wait_ms)
                reply, acked = await pipe.execute()
            break
        except rx.NoScriptError:
            if attempt:
                raise
            await redis.script_load(scripts.SCRIPTS[name])
    ack.check(int(acked))
    return reply


async def wait_after_probe(redis: Any, probe_channel: bytes, ack: ReplicaAck) -> None:
    """WAIT behind a fresh propagated write, for a write made earlier on any connection."""
    if ack.count <= 0:
        return
    async with redis.pipeline(transaction=False) as pipe:
        pipe.publish(probe_channel, b"")
        pipe.execute_command("WAIT", ack.count, ack.wait_ms)
        _, acked = await pipe.execute()
    ack.check(int(acked))
