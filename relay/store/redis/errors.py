"""Redis trouble as StoreError: the API answers 503 with Retry-After, never a 500."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from redis import exceptions as rx

from relay.store.base import StoreBusy, StoreError, StoreUnavailable

LOG = logging.getLogger("relay.store.redis")

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
