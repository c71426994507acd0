"""The store's epoch: the name of this Redis dataset's history.

It lives in `relay:epoch`, created with SET NX. A missing key means Redis lost
its dataset (flushed or replaced): a new epoch is created, and SET NX makes every
instance that notices adopt the same one.
"""

from __future__ import annotations

import logging
from typing import Any

from relay.store.base import StoreUnavailable, new_epoch
from relay.store.redis.keys import EPOCH_KEY

LOG = logging.getLogger("relay.store.redis")


class Epoch:
    def __init__(self) -> None:
        self.value = ""  # empty until Redis was reached once

    def adopt(self, value: bytes | str) -> None:
        epoch = value.decode() if isinstance(value, bytes) else value
        if epoch != self.value:
            if self.value:
                LOG.warning(
                    "the store's epoch changed from %s to %s: Redis lost its data "
                    "(flushed or replaced); clients re-sync",
                    self.value,
                    epoch,
                )
            self.value = epoch

    async def check(self, redis: Any, current: bytes | None = None, known: bool = False) -> None:
        """Adopt the epoch Redis holds (`current` when the caller fetched it), or make one."""
        if not known:
            current = await redis.get(EPOCH_KEY)
        if current is None:
            await redis.set(EPOCH_KEY, new_epoch(), nx=True)
            current = await redis.get(EPOCH_KEY)
            if current is None:
                raise StoreUnavailable()
        self.adopt(current)
