"""The seam between the API and the stores: typed optional capabilities, HTTP mapping.

A store offers the Store protocol plus whichever optional capabilities it has
(relay/store/base.py); the app asks with isinstance(). Store errors carry no HTTP
status: relay/errors.py maps them at the API edge.
"""

from __future__ import annotations

import msgspec
import pytest

from relay.errors import store_error_response, store_error_status
from relay.store.base import (
    BudgetedStore,
    LocalStatsStore,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreUnavailable,
    SweepingStore,
    WatchingStore,
)
from relay.store.memory import MemoryStore


def test_the_memory_store_has_every_capability_but_watching() -> None:
    store = MemoryStore()
    assert isinstance(store, SweepingStore)
    assert isinstance(store, LocalStatsStore)
    assert isinstance(store, BudgetedStore)
    assert not isinstance(store, WatchingStore)  # every append happens in this process


def test_the_redis_store_watches_and_counts_but_leaves_budgets_and_sweeps_to_redis() -> None:
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from relay.store.redis import RedisStore

    store = RedisStore("redis://127.0.0.1:1/0")  # never started: no connection is made
    assert isinstance(store, WatchingStore)
    assert isinstance(store, LocalStatsStore)
    assert not isinstance(store, BudgetedStore)
    assert not isinstance(store, SweepingStore)


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (StoreFull("keyring_full", "full"), 413, None),
        (StoreBusy("too_many_pairings", "busy"), 503, "60"),
        (StoreUnavailable(), 503, "1"),
        (StoreError("odd"), 503, "1"),
    ],
)
def test_store_errors_map_to_http_at_the_api_edge(
    error: StoreError, status: int, retry_after: str | None
) -> None:
    assert not hasattr(error, "status")
    assert store_error_status(error) == status
    response = store_error_response(error)
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert msgspec.json.decode(bytes(response.body)) == {
        "error": error.code,
        "message": error.message,
    }
