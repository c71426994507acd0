"""deploy/Caddyfile in front of a real relay: TLS, streams, WebSocket, client address.

Caddy runs the project's Caddyfile with only the site address (127.0.0.1, free
port, `tls internal`) and the upstream changed; clients trust Caddy's local CA
and nothing else. The relay is configured as deploy/hive-relay.env.example
configures it: it trusts exactly the proxy (127.0.0.1) for X-Forwarded-For.
The test client connects from other loopback addresses (127.0.0.x), so the
address the relay logs tells whether it saw the proxy or the real client.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_helpers import Caddy, access_clients, wait_for

from tests.conftest import require_tool
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-caddy-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENT_ADDR = "127.0.0.2"  # the "real client" behind Caddy
DIRECT_ADDR = "127.0.0.3"  # a client that talks to the relay without the proxy
SPOOFED = "203.0.113.9"


class Stack:
    def __init__(self, relay: RelayProcess, caddy: Caddy) -> None:
        self.relay = relay
        self.caddy = caddy


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    caddy_bin = require_tool("caddy")
    relay = RelayProcess(
        env={
            "HIVE_RELAY_ACCESS_TOKENS": TOKEN,
            # Exactly the proxy, as in deploy/hive-relay.env.example.
            "HIVE_RELAY_TRUSTED_PROXIES": "127.0.0.1",
            "HIVE_RELAY_ACCESS_LOG": "true",
            "HIVE_RELAY_KEEPALIVE_SECS": "1",
        }
    ).start()
    try:
        caddy = Caddy(caddy_bin, f"127.0.0.1:{relay.port}", tmp_path_factory.mktemp("caddy"))
        try:
            yield Stack(relay, caddy)
        finally:
            caddy.stop()
    finally:
        relay.stop()


def _ws_id() -> str:
    return f"e2e-{uuid.uuid4()}"


def test_health_and_status_over_tls(stack: Stack) -> None:
    with stack.caddy.client() as c:
        r = c.get("/v1/health")
        assert r.status_code == 200
        assert r.text == "ok"
        assert r.http_version in ("HTTP/1.1", "HTTP/2")
        page = c.get("/")
        assert page.status_code == 200
        assert "hive-relay" in page.text
    # The certificate really is checked: without Caddy's CA the handshake fails.
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack.caddy.url + "/v1/health", timeout=5)


def test_tokens_are_enforced_through_the_proxy(stack: Stack) -> None:
    ws = _ws_id()
    with stack.caddy.client() as c:
        r = c.post(f"/v1/workspaces/{ws}/envelopes", json={"x": 1})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]
        r = c.post(
            f"/v1/workspaces/{ws}/envelopes",
            json={"x": 1},
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401


def test_push_and_fetch_through_caddy(stack: Stack) -> None:
    ws = _ws_id()
    bodies = [{"ct": "AAEC", "n": 1}, {"ct": "AwQF", "n": 2}, [1, "two", None]]
    with stack.caddy.client(headers=AUTH) as c:
        seqs = []
        for body in bodies:
            r = c.post(f"/v1/workspaces/{ws}/envelopes", json=body)
            assert r.status_code == 200, r.text
            seqs.append(r.json()["seq"])
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        again = c.post(f"/v1/workspaces/{ws}/envelopes", json=bodies[0])
        assert again.json()["seq"] == seqs[0]
        r = c.get(f"/v1/workspaces/{ws}/envelopes", params={"after": 0})
        assert r.status_code == 200
        assert r.json() == [{"seq": s, "body": b} for s, b in zip(seqs, bodies, strict=True)]
        assert r.headers["x-relay-head"] == str(seqs[-1])
        assert r.headers["x-relay-epoch"]
        r = c.get(f"/v1/workspaces/{ws}/envelopes", params={"after": seqs[0]})
        assert [row["seq"] for row in r.json()] == seqs[1:]


async def _read_events(
    lines: asyncio.Queue[str], response: httpx.Response, stop: asyncio.Event
) -> None:
    async for line in response.aiter_lines():
        await lines.put(line)
        if stop.is_set():
            return


async def _next_data(lines: asyncio.Queue[str], timeout: float) -> tuple[str | None, str]:
    """The next SSE event with data: (id, data). Comments and blank lines skipped."""
    event_id: str | None = None
    async with asyncio.timeout(timeout):
        while True:
            line = await lines.get()
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                return event_id, line[5:].strip()


async def _sse_live(caddy: Caddy, bodies: bool) -> None:
    ws = _ws_id()
    path = f"/v1/workspaces/{ws}/events" + ("?bodies=1" if bodies else "")
    async with caddy.async_client(headers=AUTH) as c:
        async with c.stream("GET", path, timeout=httpx.Timeout(10, read=30)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers.get("content-encoding") is None
            lines: asyncio.Queue[str] = asyncio.Queue()
            stop = asyncio.Event()
            reader = asyncio.create_task(_read_events(lines, response, stop))
            try:
                # The stream's first bytes pass Caddy before anything is pushed.
                async with asyncio.timeout(10):
                    while (await lines.get()) != ": connected":
                        pass
                if not bodies:
                    _, head = await _next_data(lines, 10)
                    assert json.loads(head) == {"seq": 0}
                for n in range(3):
                    body = {"live": n, "pad": "x" * 10}
                    started = time.monotonic()
                    r = await c.post(f"/v1/workspaces/{ws}/envelopes", json=body)
                    seq = r.json()["seq"]
                    # Each event arrives on its own while the stream stays open:
                    # Caddy does not buffer it until more data or the end comes.
                    event_id, data = await _next_data(lines, 5)
                    assert time.monotonic() - started < 5
                    if bodies:
                        assert event_id == str(seq)
                        assert json.loads(data) == {"seq": seq, "body": body}
                    else:
                        assert json.loads(data) == {"seq": seq}
                # Keep-alive comments (every second here) pass the proxy too.
                async with asyncio.timeout(5):
                    while (await lines.get()) != ": keep-alive":
                        pass
            finally:
                stop.set()
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reader


def test_sse_with_bodies_arrives_live_through_caddy(stack: Stack) -> None:
    asyncio.run(_sse_live(stack.caddy, bodies=True))


def test_sse_nudges_arrive_live_through_caddy(stack: Stack) -> None:
    asyncio.run(_sse_live(stack.caddy, bodies=False))


async def _ws_round_trip(caddy: Caddy) -> None:
    from websockets.asyncio.client import connect

    ws = _ws_id()
    url = caddy.url.replace("https://", "wss://") + f"/v1/workspaces/{ws}/ws"
    # Browser-style auth (subprotocol) on one socket, header auth on the other.
    async with (
        connect(
            url, ssl=caddy.ssl_context(), subprotocols=[f"bearer.{TOKEN}"], open_timeout=10
        ) as sock_a,
        connect(url, ssl=caddy.ssl_context(), additional_headers=AUTH) as sock_b,
    ):
        for sock in (sock_a, sock_b):
            await sock.send(json.dumps({"op": "sub", "after": 0}))
        await asyncio.sleep(0.2)
        await sock_a.send(json.dumps({"op": "pub", "body": {"hello": "ws"}, "ref": "r1"}))
        got_a: list[dict[str, object]] = []
        async with asyncio.timeout(10):
            while len(got_a) < 2:
                got_a.append(json.loads(await sock_a.recv()))
            ack = next(f for f in got_a if f["op"] == "ack")
            env = next(f for f in got_a if f["op"] == "env")
            assert ack["ref"] == "r1" and ack["duplicate"] is False
            assert env == {"op": "env", "seq": ack["seq"], "body": {"hello": "ws"}}
            # The other subscriber gets it too, through the same proxy.
            assert json.loads(await sock_b.recv()) == env
    # What went over the WebSocket is what HTTP reads return.
    async with caddy.async_client(headers=AUTH) as c:
        rows = (await c.get(f"/v1/workspaces/{ws}/envelopes")).json()
        assert rows == [{"seq": ack["seq"], "body": {"hello": "ws"}}]


def test_websocket_round_trip_through_caddy(stack: Stack) -> None:
    asyncio.run(_ws_round_trip(stack.caddy))


def test_relay_sees_the_real_client_because_it_trusts_the_proxy(stack: Stack) -> None:
    ws = _ws_id()
    # Through Caddy from 127.0.0.2, with a forged X-Forwarded-For.
    with stack.caddy.client(local_address=CLIENT_ADDR, headers=AUTH) as c:
        r = c.get(f"/v1/workspaces/{ws}/keyring", headers={"X-Forwarded-For": SPOOFED})
        assert r.status_code == 200
    # Straight to the relay from 127.0.0.3 (not a trusted proxy), forging too.
    direct = httpx.HTTPTransport(local_address=DIRECT_ADDR)
    with httpx.Client(transport=direct, headers=AUTH, timeout=10) as c:
        r = c.get(
            f"{stack.relay.url}/v1/workspaces/{ws}/presence",
            headers={"X-Forwarded-For": SPOOFED},
        )
        assert r.status_code == 200

    def seen() -> dict[str, str] | None:
        lines = access_clients(stack.relay.logs())
        clients = {route: client for _, route, client in lines}
        keyring = clients.get("/v1/workspaces/{ws}/keyring")
        presence = clients.get("/v1/workspaces/{ws}/presence")
        return {"keyring": keyring, "presence": presence} if keyring and presence else None

    clients = wait_for(seen, 5, "the relay's access log lines")
    # Through the trusted proxy: the address Caddy accepted, not Caddy's own and
    # not what the client claimed.
    assert clients["keyring"] == CLIENT_ADDR
    # Not through the proxy: the socket peer; the forged header is ignored.
    assert clients["presence"] == DIRECT_ADDR
    assert SPOOFED not in stack.relay.logs()


def test_without_trusting_the_proxy_the_relay_sees_only_caddy(tmp_path: Path) -> None:
    caddy_bin = require_tool("caddy")
    with RelayProcess(env={"HIVE_RELAY_ACCESS_LOG": "true"}) as relay:
        caddy = Caddy(caddy_bin, f"127.0.0.1:{relay.port}", tmp_path / "caddy")
        try:
            with caddy.client(local_address=CLIENT_ADDR) as c:
                assert c.get("/v1/workspaces/w/keyring").status_code == 200

            def line() -> str | None:
                for _, route, client in access_clients(relay.logs()):
                    if route == "/v1/workspaces/{ws}/keyring":
                        return client
                return None

            assert wait_for(line, 5, "the access log line") == "127.0.0.1"
        finally:
            caddy.stop()


async def _sdk_round_trip(caddy: Caddy) -> None:
    from client import AsyncRelayClient, Event, Workspace

    ws_id = _ws_id()
    key = os.urandom(32).hex()

    def relay_client() -> AsyncRelayClient:
        transport = httpx.AsyncHTTPTransport(verify=caddy.ssl_context())
        return AsyncRelayClient(caddy.url, TOKEN, transport=transport)

    async with relay_client() as rc_send, relay_client() as rc_follow:
        sender = Workspace(caddy.url, ws_id, key, token=TOKEN, client=rc_send)
        follower = Workspace(caddy.url, ws_id, key, token=TOKEN, client=rc_follow)
        first = await sender.send({"kind": "hello", "n": 1})
        received: list[Event] = []

        async def follow() -> None:
            async for item in follower.events(after=0):
                if isinstance(item, Event):
                    received.append(item)
                    if len(received) == 3:
                        return

        async with asyncio.timeout(20):
            task = asyncio.create_task(follow())
            # Wait until the follower has caught up, then send while it listens live.
            while not received:
                await asyncio.sleep(0.05)
            more = [await sender.send({"kind": "hello", "n": n}) for n in (2, 3)]
            await task
        assert [e.seq for e in received] == [first, *more]
        assert [e.data for e in received] == [{"kind": "hello", "n": n} for n in (1, 2, 3)]
        assert follower.transport == "sse"
    # Through the proxy the relay stored ciphertext only.
    async with caddy.async_client(headers=AUTH) as c:
        raw = (await c.get(f"/v1/workspaces/{ws_id}/envelopes")).text
        assert len(json.loads(raw)) == 3 and "hello" not in raw


def test_client_sdk_workspace_through_caddy(stack: Stack) -> None:
    asyncio.run(_sdk_round_trip(stack.caddy))
