"""A store that fails in the middle of a live stream: the stream ends cleanly
(SSE: the chunked answer is completed; WebSocket: close 1011), never a broken
connection or a 500. A real uvicorn server runs the app in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
import websockets

from relay.app import create_app
from relay.settings import Settings
from relay.store.base import Page, StoreUnavailable
from relay.store.memory import MemoryStore
from tests.relayproc import free_port


class FailingReads(MemoryStore):
    """Reads succeed until `fail_after` of them have been served."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.reads = 0

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Page:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise StoreUnavailable()
        return await super().read(ws, after, limit, max_bytes)


@pytest.fixture
def served() -> Iterator[tuple[str, FailingReads]]:
    store = FailingReads()
    app = create_app(Settings(push_rate=0, access_log=False), store=store)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="critical", ws="websockets-sansio"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"127.0.0.1:{port}", store
    server.should_exit = True
    thread.join(10)


def test_sse_replay_failure_ends_the_stream_cleanly(served: tuple[str, FailingReads]) -> None:
    addr, store = served
    with httpx.Client(base_url=f"http://{addr}", timeout=10) as c:
        c.post("/v1/workspaces/f/envelopes", json={"i": 1})
        store.reads = 0
        store.fail_after = 1  # the head read works; the replay read fails
        with c.stream("GET", "/v1/workspaces/f/events?bodies=1&after=0") as s:
            assert s.status_code == 200
            body = s.read()  # completes: the chunked answer was ended properly
        assert body == b": connected\n\n"
        # Before the answer starts, the same failure is a plain 503 with Retry-After.
        store.reads = 0
        store.fail_after = 0
        r = c.get("/v1/workspaces/f/events?bodies=1&after=0")
        assert r.status_code == 503
        assert r.json()["error"] == "store_unavailable"
        assert "retry-after" in r.headers


def test_websocket_replay_failure_closes_with_1011(served: tuple[str, FailingReads]) -> None:
    addr, store = served

    async def scenario() -> tuple[int | None, str | None]:
        async with websockets.connect(f"ws://{addr}/v1/workspaces/g/ws") as sock:
            store.reads = 0
            store.fail_after = 0
            await sock.send(json.dumps({"op": "sub", "after": 0}))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(sock.recv(), 10)
            return sock.close_code, sock.close_reason

    assert asyncio.run(scenario()) == (1011, "store unavailable")
