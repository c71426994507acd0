"""The Lua scripts, shipped as package data in relay/store/lua/ and run by SHA.

append.lua, read.lua and commit.lua use the helpers of common.lua, which is put before them
here, so each file reads (and lints) on its own with those two names as globals.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from redis import exceptions as rx

from relay.store.redis.errors import retry_unsent

NAMES = ("append", "read", "commit", "keyring", "device_put", "device_map", "pair_create")
_WITH_COMMON = frozenset({"append", "read", "commit"})


def _source(name: str) -> str:
    return (resources.files("relay.store") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def _load() -> dict[str, str]:
    common = _source("common")
    return {name: (common if name in _WITH_COMMON else "") + _source(name) for name in NAMES}


SCRIPTS = _load()
SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}  # noqa: S324


async def load_all(redis: Any) -> None:
    """SCRIPT LOAD every script (at start-up, so the first requests need no reload)."""
    for src in SCRIPTS.values():
        await redis.script_load(src)


async def run(redis: Any, name: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA the script, loading it first if Redis lost it (a restart, SCRIPT FLUSH)."""
    try:
        return await retry_unsent(lambda: redis.evalsha(SHAS[name], len(keys), *keys, *args))
    except rx.NoScriptError:
        await redis.script_load(SCRIPTS[name])
        return await redis.evalsha(SHAS[name], len(keys), *keys, *args)
