"""Fixtures for the client SDK tests: one shared relay process, fresh workspace ids."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.support import new_workspace_id
from tests.relayproc import RelayProcess

# Rate limits off: these tests push in bursts from one address.
OPEN_RELAY_ENV = {"HIVE_RELAY_PUSH_RATE": "0", "HIVE_RELAY_PAIR_RESOLVE_RATE": "0"}


@pytest.fixture(scope="session")
def relay() -> Iterator[RelayProcess]:
    """One open relay for every test that does not need special settings."""
    with RelayProcess(env=OPEN_RELAY_ENV) as proc:
        yield proc


@pytest.fixture
def ws_id() -> str:
    """A workspace id no other test uses."""
    return new_workspace_id()
