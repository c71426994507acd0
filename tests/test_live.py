"""Live delivery against a real relay process: SSE (nudges and bodies), long-poll,
WebSocket, stream caps and slow-consumer eviction — on the memory store and on a
Redis Cluster (sharded push)."""

from __future__ import annotations

import asyncio
import json
import socket
import weakref

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse

from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WAIT = 10.0  # upper bound for any single wait; tests never assert on durations


@pytest.fixture(scope="module", params=["memory", "cluster"])
def relay(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """One relay on the memory store, and one on a private 3-primary Redis Cluster."""
    env = {"HIVE_RELAY_PUSH_RATE": "0", "HIVE_RELAY_KEEPALIVE_SECS": "0.3"}
    if request.param == "cluster":
        pytest.importorskip("redis", reason="the redis extra is not installed")
        env["HIVE_RELAY_STORE"] = request.getfixturevalue("redis_cluster").url
    with RelayProcess(env=env) as r:
        yield r


def ws_url(relay: RelayProcess, ws: str) -> str:
    return f"ws://127.0.0.1:{relay.port}/v1/workspaces/{ws}/ws"


async def push(client: httpx.AsyncClient, ws: str, body: object) -> int:
    r = await client.post(f"/v1/workspaces/{ws}/envelopes", json=body)
    assert r.status_code == 200, r.text
    return int(r.json()["seq"])


# One raw-byte iterator per open stream. Weak keys: an id() could be reused by a
# later stream and hand it a finished iterator.
_ITERS: weakref.WeakKeyDictionary[httpx.Response, object] = weakref.WeakKeyDictionary()


async def read_until(stream: httpx.Response, needle: bytes, buf: bytearray) -> bytes:
    """Read raw bytes into `buf` until it holds `needle` (one iterator per stream)."""
    it = _ITERS.setdefault(stream, stream.aiter_raw())
    async with asyncio.timeout(WAIT):
        while needle not in buf:
            buf += await it.__anext__()  # type: ignore[attr-defined]
    return bytes(buf)


async def test_nudge_stream_framing_byte_for_byte(relay: RelayProcess) -> None:
    async with httpx.AsyncClient(base_url=relay.url) as c:
        head = await push(c, "nudge", {"n": 0})
        async with c.stream("GET", "/v1/workspaces/nudge/events") as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            assert s.headers["cache-control"] == "no-cache"
            assert s.headers["x-accel-buffering"] == "no"
            assert s.headers["x-relay-head"] == str(head)
            buf = bytearray()
            start = b': connected\n\ndata: {"seq":%d}\n\n' % head
            await read_until(s, start, buf)
            assert bytes(buf[: len(start)]) == start
            seqs = [await push(c, "nudge", {"n": i}) for i in (1, 2)]
            want = start + b"".join(b'data: {"seq":%d}\n\n' % q for q in seqs)
            await read_until(s, want, buf)
            assert bytes(buf).startswith(want)
            # Idle: a keep-alive comment (0.3 s in this relay; 25 s by default).
            await read_until(s, b": keep-alive\n\n", buf)


async def test_nudge_stream_of_empty_workspace_starts_at_zero(relay: RelayProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=relay.url) as c,
        c.stream("GET", "/v1/workspaces/empty-nudge/events") as s,
    ):
        buf = bytearray()
        await read_until(s, b'data: {"seq":0}\n\n', buf)
        assert bytes(buf) == b': connected\n\ndata: {"seq":0}\n\n'


async def collect_sse(c: httpx.AsyncClient, url: str, count: int, headers=None):
    got: list[tuple[str, str, str]] = []
    async with asyncio.timeout(WAIT), aconnect_sse(c, "GET", url, headers=headers or {}) as es:
        async for ev in es.aiter_sse():
            got.append((ev.event, ev.id, ev.data))
            if len(got) >= count:
                break
    return got


async def test_sse_bodies_replay_then_live_without_dup_or_hole(relay: RelayProcess) -> None:
    async with httpx.AsyncClient(base_url=relay.url) as c:
        seqs = [await push(c, "bodies", {"i": i}) for i in range(3)]
        got: list[dict] = []

        async def reader() -> None:
            async with aconnect_sse(
                c, "GET", "/v1/workspaces/bodies/events?bodies=1&after=0"
            ) as es:
                async for ev in es.aiter_sse():
                    row = json.loads(ev.data)
                    assert ev.id == str(row["seq"])
                    got.append(row)
                    if len(got) == 6:
                        return

        task = asyncio.create_task(reader())
        for _ in range(100):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.02)
        seqs += [await push(c, "bodies", {"i": i}) for i in range(3, 6)]
        await asyncio.wait_for(task, WAIT)
        assert [r["seq"] for r in got] == seqs
        assert [r["body"] for r in got] == [{"i": i} for i in range(6)]


async def test_sse_start_cursor_rules(relay: RelayProcess) -> None:
    async with httpx.AsyncClient(base_url=relay.url) as c:
        seqs = [await push(c, "cursor", {"i": i}) for i in range(4)]
        # after= starts the replay
        got = await collect_sse(c, f"/v1/workspaces/cursor/events?bodies=1&after={seqs[1]}", 2)
        assert [int(i) for _, i, _ in got] == seqs[2:]
        # Last-Event-ID wins over after=
        got = await collect_sse(
            c,
            "/v1/workspaces/cursor/events?bodies=1&after=0",
            1,
            headers={"Last-Event-ID": str(seqs[2])},
        )
        assert [int(i) for _, i, _ in got] == seqs[3:]
        # Neither: only new envelopes. Pushed once the stream is subscribed (its
        # ": connected" comment), not after a guessed delay: a push that lands first
        # is history to this stream, and it would wait for ever.
        async with c.stream("GET", "/v1/workspaces/cursor/events?bodies=1") as s:
            buf = bytearray()
            await read_until(s, b": connected\n\n", buf)
            new = await push(c, "cursor", {"i": "new"})
            await read_until(s, b"id: %d\n" % new, buf)
        events = bytes(buf).split(b"\n\n")
        assert events[0] == b": connected"
        assert events[1].startswith(b"id: %d\n" % new), events


async def test_sse_resumes_exactly_after_reconnect(relay: RelayProcess) -> None:
    async with httpx.AsyncClient(base_url=relay.url) as c:
        first = [await push(c, "resume", {"i": i}) for i in range(3)]
        got = await collect_sse(c, "/v1/workspaces/resume/events?bodies=1&after=0", 2)
        last_id = got[-1][1]
        # The connection is dropped; more envelopes land while the client is away.
        more = [await push(c, "resume", {"i": i}) for i in range(3, 5)]
        got2 = await collect_sse(
            c, "/v1/workspaces/resume/events?bodies=1", 3, headers={"Last-Event-ID": last_id}
        )
        assert [int(i) for _, i, _ in got + got2] == first + more


async def test_sse_gap_event_when_cursor_below_dropped_horizon() -> None:
    env = {"HIVE_RELAY_PUSH_RATE": "0", "HIVE_RELAY_MAX_ENVELOPES": "2"}
    with RelayProcess(env=env) as relay:
        async with httpx.AsyncClient(base_url=relay.url) as c:
            seqs = [await push(c, "gap", {"i": i}) for i in range(5)]
            got = await collect_sse(c, "/v1/workspaces/gap/events?bodies=1&after=0", 3)
            assert got[0][0] == "gap"
            assert json.loads(got[0][2]) == {"oldest": seqs[3]}
            assert [int(i) for _, i, _ in got[1:]] == seqs[3:]
            r = await c.get(f"/v1/workspaces/gap/envelopes?after={seqs[3]}")
            assert "x-relay-gap" not in r.headers


async def test_long_poll_wakes_on_push_and_times_out_empty(relay: RelayProcess) -> None:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
        head = await push(c, "lp", {"i": 0})
        waiting = asyncio.create_task(c.get(f"/v1/workspaces/lp/envelopes?after={head}&wait=20"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        seq = await push(c, "lp", {"i": 1})
        r = await asyncio.wait_for(waiting, WAIT)
        # Had it not been woken it would have answered [] after 20 s.
        assert [row["seq"] for row in r.json()] == [seq]
        assert r.headers["x-relay-head"] == str(seq)
        r = await c.get(f"/v1/workspaces/lp/envelopes?after={seq}&wait=1")
        assert r.status_code == 200 and r.json() == []
        for bad in ("-1", "61", "x"):
            r = await c.get(f"/v1/workspaces/lp/envelopes?wait={bad}")
            assert r.status_code == 400 and r.json()["error"] == "invalid_wait"


async def live_streams(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("hive_relay_live_streams "))
    return float(line.split()[1])


async def wait_streams(c: httpx.AsyncClient, n: float) -> None:
    async with asyncio.timeout(WAIT):
        while await live_streams(c) != n:
            await asyncio.sleep(0.05)


async def test_stream_caps_answer_503_and_disconnects_free_slots() -> None:
    env = {"HIVE_RELAY_MAX_SSE": "2", "HIVE_RELAY_MAX_SSE_PER_CLIENT": "0"}
    with RelayProcess(env=env) as relay:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            poll = asyncio.create_task(c.get("/v1/workspaces/cap/envelopes?wait=30"))
            async with c.stream("GET", "/v1/workspaces/cap/events"):
                await wait_streams(c, 2)
                r = await c.get("/v1/workspaces/cap/events")
                assert r.status_code == 503
                assert r.json()["error"] == "too_many_streams"
                assert int(r.headers["retry-after"]) >= 1
                r = await c.get("/v1/workspaces/cap/envelopes?wait=5")
                assert r.status_code == 503
                with pytest.raises(websockets.InvalidStatus) as info:
                    async with websockets.connect(ws_url(relay, "cap")):
                        pass
                assert info.value.response.status_code == 503
            poll.cancel()


async def test_websocket_refused_past_cap_and_slot_freed_by_disconnect() -> None:
    env = {"HIVE_RELAY_MAX_SSE": "1"}
    with RelayProcess(env=env) as relay:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            poll = asyncio.create_task(c.get("/v1/workspaces/cap/envelopes?wait=30"))
            await wait_streams(c, 1)
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(ws_url(relay, "cap")):
                    pass
            assert info.value.response.status_code == 503
            poll.cancel()  # the client goes away mid-wait
            await wait_streams(c, 0)
            async with websockets.connect(ws_url(relay, "cap")):
                await wait_streams(c, 1)


async def test_per_client_cap() -> None:
    env = {"HIVE_RELAY_MAX_SSE": "0", "HIVE_RELAY_MAX_SSE_PER_CLIENT": "1"}
    with RelayProcess(env=env) as relay:
        async with (
            httpx.AsyncClient(base_url=relay.url, timeout=30) as c,
            c.stream("GET", "/v1/workspaces/pc/events") as s,
        ):
            assert s.status_code == 200
            r = await c.get("/v1/workspaces/pc/events?bodies=1")
            assert r.status_code == 503
            assert r.json()["error"] == "too_many_streams_for_client"


async def test_websocket_pub_sub_ack_env_and_errors(relay: RelayProcess) -> None:
    async with httpx.AsyncClient(base_url=relay.url) as c:
        before = await push(c, "wsrt", {"i": 0})
        async with websockets.connect(ws_url(relay, "wsrt")) as sock:
            assert sock.response.headers["x-relay-head"] == str(before)
            # The client offers permessage-deflate; the relay declines it (ciphertext
            # does not compress, and compression beside secrets invites CRIME-style leaks).
            assert "sec-websocket-extensions" not in sock.response.headers
            await sock.send(json.dumps({"op": "pub", "body": {"i": 1}, "key": "k1", "ref": "r1"}))
            ack = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
            assert ack["op"] == "ack" and ack["ref"] == "r1" and ack["duplicate"] is False
            await sock.send(json.dumps({"op": "pub", "body": {"i": 1}, "key": "k1", "ref": 7}))
            dup = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
            assert dup == {"op": "ack", "seq": ack["seq"], "ref": 7, "duplicate": True}
            await sock.send(json.dumps({"op": "sub", "after": 0}))
            envs = [json.loads(await asyncio.wait_for(sock.recv(), WAIT)) for _ in range(2)]
            assert [(e["op"], e["seq"]) for e in envs] == [("env", before), ("env", ack["seq"])]
            assert envs[1]["body"] == {"i": 1}
            # A push over HTTP arrives live on the socket.
            live = await push(c, "wsrt", {"i": 2})
            env = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
            assert env == {"op": "env", "seq": live, "body": {"i": 2}}
            for frame, code in (
                ("not json", "invalid_frame"),
                (json.dumps({"op": "nope"}), "unknown_op"),
                (json.dumps({"op": "pub"}), "invalid_body"),
                (json.dumps({"op": "pub", "body": 1, "key": ""}), "invalid_idempotency_key"),
            ):
                await sock.send(frame)
                err = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
                assert err["op"] == "error" and err["error"] == code, err
        r = await c.get("/v1/workspaces/wsrt/envelopes")
        assert [row["seq"] for row in r.json()] == [before, ack["seq"], live]


async def test_websocket_gap_frame() -> None:
    with RelayProcess(env={"HIVE_RELAY_MAX_ENVELOPES": "1", "HIVE_RELAY_PUSH_RATE": "0"}) as relay:
        async with httpx.AsyncClient(base_url=relay.url) as c:
            seqs = [await push(c, "wsgap", i) for i in range(3)]
            async with websockets.connect(ws_url(relay, "wsgap")) as sock:
                await sock.send(json.dumps({"op": "sub", "after": 0}))
                gap = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
                assert gap == {"op": "gap", "oldest": seqs[2]}
                env = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
                assert env["seq"] == seqs[2]


async def test_access_rules_apply_to_every_stream() -> None:
    with RelayProcess(env={"HIVE_RELAY_ACCESS_TOKENS": "good-token"}) as relay:
        async with httpx.AsyncClient(base_url=relay.url) as c:
            r = await c.get("/v1/workspaces/acl/events")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = await c.get("/v1/workspaces/acl/envelopes?wait=5")
            assert r.status_code == 401
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(ws_url(relay, "acl")):
                    pass
            assert info.value.response.status_code == 401
            # Header auth and the browser subprotocol both work.
            async with websockets.connect(
                ws_url(relay, "acl"), additional_headers={"Authorization": "Bearer good-token"}
            ) as sock:
                await sock.send(json.dumps({"op": "pub", "body": 1}))
                assert json.loads(await sock.recv())["op"] == "ack"
            async with websockets.connect(
                ws_url(relay, "acl"), subprotocols=["bearer.good-token"]
            ) as sock:
                assert sock.subprotocol == "bearer.good-token"
                await sock.send(json.dumps({"op": "sub", "after": 0}))
                assert json.loads(await sock.recv())["op"] == "env"
            async with c.stream(
                "GET", "/v1/workspaces/acl/events", headers={"Authorization": "Bearer good-token"}
            ) as s:
                assert s.status_code == 200


async def test_slow_consumer_is_disconnected_and_relay_stays_healthy() -> None:
    env = {"HIVE_RELAY_STREAM_BUFFER": "4", "HIVE_RELAY_PUSH_RATE": "0"}
    with RelayProcess(env=env) as relay:
        # A subscriber that never reads: a raw socket with a tiny receive buffer.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(b"GET /v1/workspaces/slow/events?bodies=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        pad = "x" * 60_000
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            await wait_streams(c, 1)
            n = 0
            async with asyncio.timeout(60):
                while await live_streams(c) != 0:
                    for _ in range(20):
                        n += 1  # distinct bodies: identical ones would be deduplicated
                        body = json.dumps({"n": n, "pad": pad})
                        await c.post("/v1/workspaces/slow/envelopes", content=body)
            text = (await c.get("/metrics")).text
            assert "hive_relay_slow_consumers_disconnected_total 1.0" in text
            assert (await c.get("/v1/health")).status_code == 200
        sock.close()
