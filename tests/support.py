"""Helpers shared by the relay's test files: in-process clients, error checks, clocks.

A helper used by more than one test file lives here (or, for real processes, in
tests/relayproc.py and tests/redisproc.py) so that every test checks a rule the
same way.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from starlette.testclient import TestClient

from relay.app import create_app
from relay.settings import Settings


def make_client(store: Any = None, **settings: Any) -> TestClient:
    """An in-process relay with the push rate limit off (unless `settings` set it)."""
    settings.setdefault("push_rate", 0)
    return TestClient(create_app(Settings(**settings), store=store))


def make_unlimited_client(**settings: Any) -> TestClient:
    """`make_client` with the pairing rate limits off too."""
    settings.setdefault("pair_resolve_rate", 0)
    settings.setdefault("pair_create_rate", 0)
    return make_client(**settings)


def assert_error(r: Any, status: int, code: str) -> None:
    """`r` is the relay's JSON error answer: `status`, {"error": code, "message": ...}."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    answer = r.json()
    assert set(answer) == {"error", "message"}, answer
    assert answer["error"] == code, answer
    assert isinstance(answer["message"], str) and answer["message"]


def digest(body: bytes) -> bytes:
    """The dedup key the relay gives a body sent without a key."""
    return hashlib.sha256(body).digest()


def as_client(address: str) -> dict[str, str]:
    """Headers that make a request come from `address` behind a trusted proxy."""
    return {"X-Forwarded-For": address}


class FakeTime:
    """Stands in for the `time` module in one relay module, with a clock tests move."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time_ns(self) -> int:
        return time.time_ns() + int(self.offset * 1e9)
