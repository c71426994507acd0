"""The Cluster's slot map as this relay knows it: which primary serves which slot.

Read with `CLUSTER SLOTS` from any reachable node (the primaries known, then the
URL's nodes), by the ClusterFollower when a link fails, a slot moves away from a
link (SUNSUBSCRIBE from the server), a write meets MOVED, and every few seconds.
It is kept apart from redis-py's own map inside RedisCluster on purpose: that one
is refreshed by redis-py as its commands meet redirections, and asking it to
refresh recycles every pooled connection; this one only steers the sharded pub/sub
links and the replica-acknowledged writes, which go to a node's own connection.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from relay.store.base import StoreError
from relay.store.redis.connect import Clients
from relay.store.redis.errors import redis_errors

LOG = logging.getLogger("relay.store.redis")

Addr = tuple[str, int]


def slot_of(key: str | bytes) -> int:
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SlotMap:
    def __init__(self, clients: Clients) -> None:
        self._clients = clients
        self._slots: list[Addr | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._probes: dict[Addr, Any] = {}  # a small client per node, for CLUSTER SLOTS
        self.known = False

    def addr_of(self, key: str | bytes) -> Addr | None:
        """The primary serving key's slot, or None while no primary is known for it."""
        return self._slots[slot_of(key)]

    def primaries(self) -> set[Addr]:
        return {a for a in self._slots if a is not None}

    def moved(self, key: str | bytes, addr: Addr) -> None:
        """A MOVED answer named the slot's new primary."""
        self._slots[slot_of(key)] = addr

    async def refresh(self) -> bool:
        """Read the map from the first node that answers; False when none did."""
        seen: list[Addr] = []
        for addr in [*sorted(self.primaries()), *self._clients.startup]:
            if addr in seen:
                continue
            seen.append(addr)
            try:
                with redis_errors():
                    ranges = await self._probe(addr).execute_command("CLUSTER", "SLOTS")
            except StoreError:
                continue
            slots: list[Addr | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for item in ranges:
                start, end, primary = int(item[0]), int(item[1]), item[2]
                host = _text(primary[0]) or addr[0]  # an empty host: the node asked
                node = (host, int(primary[1]))
                for slot in range(start, end + 1):
                    slots[slot] = node
            self._slots = slots
            self.known = True
            return True
        LOG.debug("no Redis Cluster node answered CLUSTER SLOTS")
        return False

    def _probe(self, addr: Addr) -> Any:
        client = self._probes.get(addr)
        if client is None:
            assert self._clients.timeouts is not None
            t = self._clients.timeouts.connect
            client = self._clients.node_client(
                addr[0], addr[1], socket_timeout=t, socket_connect_timeout=t, max_connections=2
            )
            self._probes[addr] = client
        return client

    async def aclose(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        for client in probes:
            with contextlib.suppress(Exception):
                await client.aclose()
