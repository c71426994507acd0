"""The Redis store's Lua scripts as files: all shipped, each valid for a real Redis.

The scripts live in relay/store/lua/ (package data) so they can be read and
linted on their own; relay/store/redis/scripts.py loads them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.redisproc import redis_url

redis = pytest.importorskip("redis", reason="the redis extra is not installed")
from relay.store.redis import scripts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with redis_url() as u:
        yield u


def test_every_lua_file_is_loaded_and_every_script_comes_from_a_file() -> None:
    files = {p.name for p in (resources.files("relay.store") / "lua").iterdir()}
    assert files == {f"{name}.lua" for name in (*scripts.NAMES, "common")}
    assert set(scripts.SCRIPTS) == set(scripts.NAMES)
    for name, src in scripts.SCRIPTS.items():
        own = (REPO / "relay" / "store" / "lua" / f"{name}.lua").read_text(encoding="utf-8")
        assert src.endswith(own)
        # The scripts that use the shared helpers get them put first.
        assert ("local function fmt(" in src) == (name in ("append", "read", "commit"))


def test_each_script_compiles_in_a_real_redis_server_under_its_sha(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.script_flush()
        for name, src in scripts.SCRIPTS.items():
            assert client.script_load(src) == scripts.SHAS[name], name
        assert client.script_exists(*scripts.SHAS.values()) == [True] * len(scripts.SHAS)
        # A script with a Lua syntax error is refused at SCRIPT LOAD: the check above bites.
        with pytest.raises(redis.exceptions.ResponseError):
            client.script_load(scripts.SCRIPTS["keyring"] + "\nlocal = 1\n")
    finally:
        client.close()


def test_the_lua_scripts_pass_luacheck() -> None:
    luacheck = require_tool("luacheck")  # Debian: lua-check
    done = subprocess.run(
        [luacheck, "--no-color", "--codes", "relay/store/lua/"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 files" in done.stdout
