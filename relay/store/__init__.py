"""open_store(settings) → the Store the URL names: memory:// or redis://…"""

from __future__ import annotations

from relay.settings import Settings, SettingsError
from relay.store.base import Bounds, Store


def bounds_from_settings(settings: Settings) -> Bounds:
    return Bounds(
        max_envelopes=settings.max_envelopes,
        retention_secs=settings.retention_days * 86400.0,
        max_bytes=settings.max_bytes,
        max_keyring=settings.max_keyring,
        max_devices=settings.max_devices,
        max_side_bytes=settings.max_side_bytes,
        max_pairings=settings.max_pairings,
        presence_ttl=settings.presence_ttl,
        idle_workspace_secs=settings.idle_workspace_secs,
    )


def open_store(settings: Settings) -> Store:
    bounds = bounds_from_settings(settings)
    if settings.store_kind == "memory":
        from relay.store.memory import MemoryStore

        return MemoryStore(bounds)
    try:
        from relay.store.redis import RedisStore
    except ImportError as exc:
        raise SettingsError(
            f"HIVE_RELAY_STORE: the Redis store is not available ({exc}); "
            "install the extra: pip install 'hive-relay[redis]'"
        ) from None
    return RedisStore(
        settings.store,
        bounds,
        min_replicas=settings.redis_min_replicas,
        wait_ms=settings.redis_wait_ms,
    )
