"""The figures deploy/prometheus/alerts.yml needs, as /metrics exports them."""

from __future__ import annotations

from starlette.testclient import TestClient

from relay.app import create_app
from relay.settings import Settings
from relay.store.base import Page, StoreUnavailable
from relay.store.memory import MemoryStore


class UnavailableReads(MemoryStore):
    """A memory store whose reads fail as a Redis store's do when Redis is down."""

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        raise StoreUnavailable()


def test_store_unavailable_answers_are_counted_by_reason() -> None:
    app = create_app(Settings(access_log=False), store=UnavailableReads())
    with TestClient(app) as c:
        before = c.get("/metrics").text
        assert "hive_relay_unavailable_total{" not in before
        for _ in range(2):
            r = c.get("/v1/workspaces/w/envelopes")
            assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
        after = c.get("/metrics").text
    assert 'hive_relay_unavailable_total{reason="store_unavailable"} 2.0' in after


def test_memory_budget_limit_is_exported_beside_the_charged_bytes() -> None:
    app = create_app(Settings(access_log=False, max_bytes=12_345_678))
    with TestClient(app) as c:
        text = c.get("/metrics").text
    assert "hive_relay_budget_limit_bytes 1.2345678e+07" in text
    assert "hive_relay_budget_bytes " in text
