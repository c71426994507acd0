"""Redis trouble as StoreError: the API answers 503 with Retry-After, never a 500."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from redis import exceptions as rx

from relay.store.base import StoreBusy, StoreError, StoreUnavailable

LOG = logging.getLogger("relay.store.redis")

T = TypeVar("T")

BUSY_RETRY_AFTER = 30  # seconds a client waits after Redis refused a write (maxmemory)

# Errors Redis answers while it cannot serve (yet): all mean "try again".
_TRANSIENT = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


def _full() -> StoreBusy:
    return StoreBusy(
        "relay_full",
        "the relay's store is full (Redis maxmemory); try again later",
        retry_after=BUSY_RETRY_AFTER,
    )


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Maps what redis-py raises inside the block to StoreBusy or StoreUnavailable."""
    try:
        yield
    except StoreError:
        raise
    except rx.OutOfMemoryError:
        raise _full() from None
    except (rx.AskError, rx.ClusterError, rx.TryAgainError) as exc:
        # A slot moving or a shard failing over (MOVED/ASK past redis-py's retries,
        # CLUSTERDOWN, TRYAGAIN while a workspace's keys migrate): try again soon.
        LOG.debug("Redis Cluster slot unavailable: %r", exc)
        raise StoreUnavailable(retry_after=1) from None
    except rx.ResponseError as exc:
        text = str(exc)
        if text.startswith("OOM"):
            raise _full() from None
        if not text.startswith(_TRANSIENT):
            LOG.error("Redis answered an unexpected error: %s", text)
        raise StoreUnavailable(retry_after=2) from None
    except (TimeoutError, rx.RedisError, OSError) as exc:
        LOG.debug("Redis unavailable: %r", exc)
        raise StoreUnavailable() from None
    except rx.RedisClusterException as exc:
        # SlotNotCoveredError (a shard without a primary), "no nodes reachable", …:
        # that shard's workspaces answer 503 until the Cluster has healed.
        LOG.debug("Redis Cluster unavailable: %r", exc)
        raise StoreUnavailable() from None
    except (RuntimeError, AttributeError) as exc:
        # What redis-py lets out while a node dies under a command: a closed
        # transport ("handler is closed"), or a connection torn down mid-write
        # ("'NoneType' object has no attribute 'writelines'"). Logged, not hidden.
        LOG.warning("Redis connection failed under a command: %r", exc)
        raise StoreUnavailable() from None


async def retry_unsent(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, once more if it failed before its command left.

    While RedisCluster refreshes its slot map (after a node failed) it recycles
    the pooled connections of every node, and a command that picks one up as it
    closes fails on sending: RuntimeError from a closed (uvloop) transport, or
    AttributeError from a connection whose writer is gone. Nothing was sent, so
    a second try is safe for any command, and it takes a fresh connection.
    """
    try:
        return await call()
    except (RuntimeError, AttributeError) as exc:
        LOG.debug("Redis command not sent (%r); trying once more", exc)
        return await call()
