"""The HTTP layer's one route table (relay/app.py ROUTES), the hot lane it feeds,
and live-stream slots held as a context manager."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse

from relay.app import LIVE_ROUTES, ROUTES, cors_lists, create_app
from relay.errors import RelayError
from relay.limits import StreamSlots
from relay.settings import Settings
from relay.store.memory import MemoryStore

ORIGIN = "https://app.example"


def test_the_router_serves_the_route_table_and_nothing_else() -> None:
    app = create_app(Settings())
    served = {}
    for route in app.routes:
        assert isinstance(route, Route | WebSocketRoute)
        methods = set(getattr(route, "methods", None) or ())
        served[route.path] = (route.name, methods)
    declared = {
        spec.path: (spec.name, set(spec.by_method()) if spec.socket is None else set())
        for spec in ROUTES
    }
    assert served == declared
    assert len({spec.name for spec in ROUTES}) == len(ROUTES)  # names are unique
    assert {
        "/v1/workspaces/{ws}/events",
        "/v1/workspaces/{ws}/ws",
        "/v1/status/samples",
    } == LIVE_ROUTES


def test_cors_lists_cover_every_header_the_routes_read_or_set() -> None:
    lists = cors_lists()
    assert lists["allow_methods"] == ["GET", "POST", "HEAD", "OPTIONS"]
    for name in ("Authorization", "Content-Type", "Idempotency-Key", "Idempotency-Keys"):
        assert name in lists["allow_headers"]
    for name in ("X-Hive-Event-Id", "Last-Event-ID"):
        assert name in lists["allow_headers"]
    for name in ("X-Relay-Head", "X-Relay-Oldest", "X-Relay-Epoch", "X-Relay-Gap"):
        assert name in lists["expose_headers"]
    for name in ("X-Relay-More", "X-Relay-Next", "Retry-After"):
        assert name in lists["expose_headers"]
    assert len(set(lists["allow_headers"])) == len(lists["allow_headers"])


@pytest.mark.parametrize("cors", ["", ORIGIN])
def test_hot_routes_skip_the_router_whatever_the_cors_setting(cors: str) -> None:
    app = create_app(Settings(cors_origins=cors))
    routed: list[str] = []
    with TestClient(app) as c:
        inner = app.router.middleware_stack

        async def counting(scope: Any, receive: Any, send: Any) -> None:
            routed.append(scope["path"])
            await inner(scope, receive, send)

        app.router.middleware_stack = counting
        headers = {"Origin": ORIGIN}
        assert c.post("/v1/workspaces/w/envelopes", json=1, headers=headers).status_code == 200
        r = c.get("/v1/workspaces/w/envelopes?after=0", headers=headers)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/v1/workspaces/w/envelopes?after=x").status_code == 400
        assert routed == []  # none of those met the router
        assert c.get("/v1/workspaces/w/keyring").status_code == 200
        assert c.put("/v1/workspaces/w/envelopes").status_code == 405  # the router's answer
        assert routed == ["/v1/workspaces/w/keyring", "/v1/workspaces/w/envelopes"]
        if cors:
            assert r.headers["access-control-allow-origin"] == ORIGIN
        else:
            assert "access-control-allow-origin" not in r.headers


class BrokenReads(MemoryStore):
    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Any:
        raise RuntimeError("a bug in the store")


def test_a_hot_route_500_with_cors_on_is_readable_by_the_browser() -> None:
    """The hot lane sits inside CORSMiddleware and answers its own 500, so a browser
    client sees the JSON error rather than an opaque CORS failure."""
    app = create_app(Settings(cors_origins=ORIGIN), store=BrokenReads())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/workspaces/w/envelopes", headers={"Origin": ORIGIN})
        assert r.status_code == 500
        assert r.json()["error"] == "internal_error"
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"


def test_presence_and_candidates_are_separate_channels() -> None:
    with TestClient(create_app(Settings())) as c:
        body = {"device_id": "d1", "data": {"where": "presence"}}
        assert c.post("/v1/workspaces/w/presence", json=body).status_code == 200
        assert c.get("/v1/workspaces/w/presence").json() == {"d1": {"where": "presence"}}
        assert c.get("/v1/workspaces/w/candidates").json() == {}


def test_a_stream_slot_is_given_back_however_the_stream_ends() -> None:
    slots = StreamSlots(max_total=2, max_per_client=1)
    with slots.hold("a"):
        assert slots.total == 1
        with pytest.raises(RelayError) as refused, slots.hold("a"):
            pytest.fail("a second slot for the same client")  # pragma: no cover
        assert refused.value.code == "too_many_streams_for_client"
        assert slots.total == 1  # the refusal took nothing
    assert slots.total == 0
    with pytest.raises(ValueError), slots.hold("b"):
        raise ValueError("the stream failed")
    assert slots.total == 0
    with slots.hold("a"), slots.hold("b"):
        with pytest.raises(RelayError) as full, slots.hold("c"):
            pytest.fail("a third slot past the total")  # pragma: no cover
        assert full.value.status == 503 and full.value.code == "too_many_streams"
        assert full.value.headers["retry-after"] == "5"
    assert slots.total == 0


def test_streams_refused_for_want_of_a_slot_answer_503_and_take_nothing() -> None:
    app = create_app(Settings(max_sse=1))
    relay = app.state.relay
    with TestClient(app) as c, relay.slots.hold("someone else"):
        r = c.get("/v1/workspaces/w/events")
        assert r.status_code == 503
        assert r.json()["error"] == "too_many_streams"
        assert r.headers["retry-after"] == "5"
        assert r.headers["x-content-type-options"] == "nosniff"
        r = c.get("/v1/workspaces/w/envelopes?wait=5")
        assert r.status_code == 503 and r.json()["error"] == "too_many_streams"
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            c.websocket_connect("/v1/workspaces/w/ws"),
        ):
            pytest.fail("a WebSocket past the cap")  # pragma: no cover
        assert denied.value.status_code == 503
        assert denied.value.json()["error"] == "too_many_streams"
        assert relay.slots.total == 1  # only the slot held above
        metrics = c.get("/metrics").text
    assert relay.slots.total == 0
    # Each refusal is counted for the "stream cap reached" alert, next to the cap.
    assert 'hive_relay_unavailable_total{reason="too_many_streams"} 3.0' in metrics
    assert "hive_relay_live_streams_limit 1.0" in metrics
