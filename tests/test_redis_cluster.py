"""The Redis Cluster store (`redis+cluster://`) on private clusters of redis-server
processes (tests/redisproc.py RedisCluster, made by `redis-cli --cluster create`).

Workspaces on every shard: their keys stay in one slot on the shard that owns it,
nothing crosses slots; two relays deliver across instances over SSE, WebSocket and
long-poll for workspaces on every shard; MIN_REPLICAS waits on the slot's own
node; a slot moved under a live watch (MOVED, ASK) loses no row.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets

from relay.store.base import Bounds, StoreUnavailable
from tests.redisproc import RedisCluster
from tests.relayproc import RelayProcess
from tests.test_redis_relays import push, relay_env, sse_rows

pytest.importorskip("redis", reason="the redis extra is not installed")

# Every test here but the two error-mapping ones starts or uses a private Cluster.
pytestmark = pytest.mark.anyio
WAIT = 15.0  # upper bound for any single wait; tests never assert on durations
BIG = 1 << 40


def keys_of(ws: str) -> list[str]:
    tag = f"relay:{{{ws}}}:"
    return [tag + k for k in ("log", "dedup", "meta", "keyring", "presence", "presence:t")]


async def started(url: str, **kw: Any) -> Any:
    from relay.store.redis import RedisStore

    store = RedisStore(url, Bounds(), **kw)
    await store.start()
    return store


@pytest.fixture
async def stores(redis_cluster: RedisCluster) -> AsyncIterator[list[Any]]:
    redis_cluster.flush()
    made: list[Any] = []
    yield made
    for store in made:
        await store.close()


@pytest.mark.slow
async def test_workspaces_on_every_shard_keep_their_keys_in_one_slot(
    redis_cluster: RedisCluster, stores: list[Any]
) -> None:
    store = await started(redis_cluster.url)
    stores.append(store)
    per_shard = redis_cluster.workspaces_per_shard(2, prefix="spread")
    assert len(per_shard) == 3
    for port, names in per_shard.items():
        for ws in names:
            _, dup = await store.append(ws, b'{"a":1}', b"k1")
            assert not dup
            out = await store.append_batch(ws, [b"2", b"3"], [b"k2", b"k3"])
            assert [d for _, d in out] == [False, False]
            await store.keyring_append(ws, b"blob")
            await store.device_put("presence", ws, "dev", b"here")
            page = await store.read(ws, 0, 10, BIG)
            assert len(page.rows) == 3
            assert await store.keyring_list(ws) == [b"blob"]
            assert await store.device_map("presence", ws) == [("dev", b"here")]
            slots = {redis_cluster.keyslot(k) for k in keys_of(ws)}
            assert len(slots) == 1  # one slot per workspace: every script stays in it
            owner = redis_cluster.node_for(keys_of(ws)[0])
            assert owner.port == port
            client = owner.client()
            try:
                assert all(client.exists(k) for k in keys_of(ws)), ws
            finally:
                client.close()
    # Keys outside a workspace: pairing (one slot of its own), epoch, stats.
    code = await store.pair_create("payload", 60)
    assert await store.pair_resolve(code) == "payload"
    stats = await store.stats()
    assert stats.envelopes == 18
    assert stats.pairings == 1
    assert await store.ping()


@pytest.mark.slow
async def test_live_delivery_follows_every_shard(
    redis_cluster: RedisCluster, stores: list[Any]
) -> None:
    a = await started(redis_cluster.url)
    b = await started(redis_cluster.url)
    stores += [a, b]
    got: dict[str, list[int]] = {}
    b.set_listener(lambda ws, rows: got.setdefault(ws, []).extend(s for s, _ in rows))
    names = [ws for ns in redis_cluster.workspaces_per_shard(2, "live").values() for ws in ns]
    for ws in names:
        b.watch(ws)
        await b.read(ws, 0, 1, BIG)  # waits for the watch
    sent: dict[str, list[int]] = {ws: [] for ws in names}
    for i in range(5):
        for ws in names:
            sent[ws].append((await a.append(ws, b"%d" % i, b"k%d" % i))[0])
    async with asyncio.timeout(WAIT):
        while got != sent:
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_min_replicas_without_replicas_answers_503_and_the_retry_is_single(
    redis_cluster: RedisCluster, stores: list[Any]
) -> None:
    store = await started(redis_cluster.url, min_replicas=1, wait_ms=50)
    stores.append(store)
    for ws in [ns[0] for ns in redis_cluster.workspaces_per_shard(1, "nowait").values()]:
        for _ in range(2):  # the retry with the same key is refused as well, not doubled
            with pytest.raises(StoreUnavailable) as refused:
                await store.append(ws, b'{"x":1}', b"key")
            assert refused.value.retry_after >= 1
        # Stored once on the slot's primary, but never shown: no WAIT succeeded
        # (notify-after-WAIT, docs/scaling.md).
        page = await store.read(ws, 0, 10, BIG)
        assert page.rows == [] and page.head == 0
        node = redis_cluster.node_for(f"relay:{{{ws}}}:log").client()
        try:
            assert node.xlen(f"relay:{{{ws}}}:log") == 1
        finally:
            node.close()
        with pytest.raises(StoreUnavailable):
            await store.keyring_append(ws, b"k")


@pytest.fixture(scope="module")
def replicated() -> Iterator[RedisCluster]:
    """3 primaries, each with one replica."""
    with RedisCluster(primaries=3, replicas=1) as cluster:
        yield cluster


@pytest.mark.slow
async def test_min_replicas_on_a_cluster_waits_on_the_slots_node(
    replicated: RedisCluster,
) -> None:
    store = await started(replicated.url, min_replicas=1, wait_ms=2000)
    try:
        for ws in [ns[0] for ns in replicated.workspaces_per_shard(1, "acked").values()]:
            seq, dup = await store.append(ws, b'{"x":1}', b"key")
            assert not dup
            assert await store.append(ws, b'{"x":1}', b"key") == (seq, True)
            out = await store.append_batch(ws, [b"1", b"2"], [b"a", b"b"])
            assert [d for _, d in out] == [False, False]
            await store.keyring_append(ws, b"blob")
            await store.device_put("candidates", ws, "dev", b"c")
            primary = replicated.node_for(keys_of(ws)[0])
            (replica,) = replicated.replica_of(primary)
            client = replica.client()
            try:  # WAIT said one replica has it: it is there
                client.execute_command("READONLY")
                assert client.xlen(keys_of(ws)[0]) == 3
            finally:
                client.close()
        assert await store.pair_resolve(await store.pair_create("p", 60)) == "p"
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.parametrize("acked", [0, 1])
async def test_a_slot_moved_under_a_live_watch_loses_nothing(
    replicated: RedisCluster, acked: int
) -> None:
    """The watched workspace's slot moves to another primary in two steps (keys
    migrated: ASK; then the slot reassigned: MOVED); writes keep succeeding through
    both, and the listener of another instance gets every row once, in order."""
    writer = await started(replicated.url, min_replicas=acked, wait_ms=2000)
    watcher = await started(replicated.url)
    try:
        async with asyncio.timeout(WAIT * 6):  # a hang is a failure, not a stalled run
            await _move_under_watch(replicated, writer, watcher, acked)
    finally:
        await writer.close()
        await watcher.close()


async def _move_under_watch(
    replicated: RedisCluster, writer: Any, watcher: Any, acked: int
) -> None:
    ws = f"moving{acked}"
    got: list[int] = []
    watcher.set_listener(lambda w, rows: got.extend(s for s, _ in rows) if w == ws else None)
    watcher.watch(ws)
    await watcher.read(ws, 0, 1, BIG)
    sent = [(await writer.append(ws, b"0", b"k0"))[0]]
    slot = replicated.keyslot(keys_of(ws)[0])
    src = replicated.node_for_slot(slot)
    dst = next(n for n in replicated.primary_nodes() if n is not src)
    replicated.begin_move(slot, dst)
    sent.append((await writer.append(ws, b"1", b"k1"))[0])  # ASK
    replicated.finish_move(slot, dst)
    for i in range(2, 6):
        sent.append((await writer.append(ws, b"%d" % i, b"k%d" % i))[0])  # MOVED, then new map
    async with asyncio.timeout(WAIT):
        while got != sent:
            assert len(got) <= len(sent) and got == sent[: len(got)], (got, sent)
            await asyncio.sleep(0.02)
    page = await watcher.read(ws, 0, 100, BIG)
    assert [int(json.loads(r)["seq"]) for r in page.rows] == sent


# ------------------------------------------------------------ two relays, every shard
@pytest.fixture(scope="module")
def two_relays(redis_cluster: RedisCluster) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    redis_cluster.flush()
    with (
        RelayProcess(env=relay_env(redis_cluster.url)) as a,
        RelayProcess(env=relay_env(redis_cluster.url)) as b,
    ):
        yield a, b
        for relay in (a, b):
            assert " 500 " not in relay.logs()
            assert "Traceback" not in relay.logs()
            assert "CROSSSLOT" not in relay.logs()


@pytest.mark.slow
async def test_two_relays_deliver_sse_websocket_and_long_poll_on_every_shard(
    redis_cluster: RedisCluster, two_relays: tuple[RelayProcess, RelayProcess]
) -> None:
    a, b = two_relays
    per_shard = redis_cluster.workspaces_per_shard(1, "relayed")
    names = [ns[0] for ns in per_shard.values()]
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=WAIT) as ca,
        httpx.AsyncClient(base_url=b.url, timeout=WAIT) as cb,
    ):
        heads = {ws: await push(ca, ws, {"n": 0, "ws": ws}) for ws in names}
        sse: dict[str, list[Any]] = {ws: [] for ws in names}
        live = {ws: asyncio.Event() for ws in names}
        streams = [
            asyncio.create_task(sse_rows(cb, ws, heads[ws], 2, sse[ws], live[ws])) for ws in names
        ]
        sockets = []
        for ws in names:
            conn = await websockets.connect(f"ws://127.0.0.1:{b.port}/v1/workspaces/{ws}/ws")
            await conn.send(json.dumps({"op": "sub", "after": heads[ws]}))
            sockets.append(conn)
        polls = [
            asyncio.create_task(
                cb.get(f"/v1/workspaces/{ws}/envelopes", params={"after": heads[ws], "wait": 10})
            )
            for ws in names
        ]
        async with asyncio.timeout(WAIT):
            for ws in names:
                await live[ws].wait()
        await asyncio.sleep(0.2)  # let the polls and subscriptions park (correct either way)
        sent = {ws: [await push(ca, ws, {"n": i, "ws": ws}) for i in (1, 2)] for ws in names}
        for ws, poll in zip(names, polls, strict=True):
            r = await asyncio.wait_for(poll, WAIT)
            assert r.status_code == 200, r.text
            assert [row["seq"] for row in r.json()] == sent[ws][: len(r.json())]
            assert r.json()[0] == {"seq": sent[ws][0], "body": {"n": 1, "ws": ws}}
        for ws, conn in zip(names, sockets, strict=True):
            frames = [json.loads(await asyncio.wait_for(conn.recv(), WAIT)) for _ in range(2)]
            assert frames == [
                {"op": "env", "seq": sent[ws][i], "body": {"n": i + 1, "ws": ws}} for i in range(2)
            ]
            await conn.close()
        await asyncio.wait_for(asyncio.gather(*streams), WAIT)
        for ws in names:
            assert [row["seq"] for row in sse[ws]] == sent[ws]
            assert [row["body"]["n"] for row in sse[ws]] == [1, 2]


@pytest.mark.slow
async def test_a_shard_without_primary_answers_503_and_the_others_keep_working() -> None:
    """One primary of three (no replicas) is killed: its workspaces answer 503 with
    Retry-After, the other shards' workspaces keep working, health stays 200; once
    it is back (AOF), writes and a live stream opened before resume without restart."""
    with RedisCluster(primaries=3, aof=True) as cluster:
        per_shard = cluster.workspaces_per_shard(1, "down")
        victim = cluster.primary_nodes()[0]
        dead_ws = per_shard[victim.port][0]
        alive_ws = [ns[0] for port, ns in per_shard.items() if port != victim.port]
        with (
            RelayProcess(env=relay_env(cluster.url)) as a,
            RelayProcess(env=relay_env(cluster.url)) as b,
        ):
            async with (
                httpx.AsyncClient(base_url=a.url, timeout=WAIT) as ca,
                httpx.AsyncClient(base_url=b.url, timeout=WAIT) as cb,
            ):
                acked = [await push(ca, dead_ws, {"n": i}) for i in range(3)]
                got: list[Any] = []
                live = asyncio.Event()
                stream = asyncio.create_task(sse_rows(cb, dead_ws, acked[-1], 1, got, live))
                await asyncio.wait_for(live.wait(), WAIT)
                victim.kill()
                async with asyncio.timeout(WAIT):
                    while True:
                        r = await ca.post(f"/v1/workspaces/{dead_ws}/envelopes", json={"x": 1})
                        if r.status_code == 503:
                            break
                        assert r.status_code == 200, r.text  # before the kill was noticed
                        acked.append(int(r.json()["seq"]))
                assert int(r.headers["retry-after"]) > 0
                assert r.json()["error"] == "store_unavailable"
                r = await cb.get(f"/v1/workspaces/{dead_ws}/envelopes")
                assert r.status_code == 503
                assert int(r.headers["retry-after"]) > 0
                for ws in alive_ws:
                    seq = await push(ca, ws, {"ok": ws})
                    r = await cb.get(f"/v1/workspaces/{ws}/envelopes")
                    assert r.status_code == 200, r.text
                    assert r.json() == [{"seq": seq, "body": {"ok": ws}}]
                assert (await ca.get("/v1/health")).status_code == 200
                victim.start()  # same port, directory and nodes.conf: it takes its slots back
                cluster.wait_ok()
                async with asyncio.timeout(WAIT):
                    while True:
                        r = await ca.post(f"/v1/workspaces/{dead_ws}/envelopes", json={"n": "b"})
                        if r.status_code == 200:
                            break
                        assert r.status_code == 503, r.text
                        await asyncio.sleep(0.1)
                back = int(r.json()["seq"])
                await asyncio.wait_for(stream, WAIT)
                assert got == [{"seq": back, "body": {"n": "b"}}]
                r = await cb.get(f"/v1/workspaces/{dead_ws}/envelopes")
                assert [row["seq"] for row in r.json()] == [*acked, back]
            for relay in (a, b):
                assert " 500 " not in relay.logs()
                assert "Traceback" not in relay.logs()


# ------------------------------------------------------------------ error mapping
@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("unable to perform operation on <TCPTransport closed=True>"),
        AttributeError("'NoneType' object has no attribute 'writelines'"),
        pytest.param("SlotNotCoveredError", id="slot-not-covered"),
        pytest.param("ClusterDownError", id="clusterdown"),
        pytest.param("TryAgainError", id="tryagain"),
        pytest.param("MovedError", id="moved"),
        pytest.param("AskError", id="ask"),
        pytest.param("RedisClusterException", id="cluster-exception"),
    ],
)
async def test_what_redis_py_raises_while_a_node_dies_is_503_not_500(exc: Any) -> None:
    from redis import exceptions as rx

    from relay.errors import store_error_status
    from relay.store.redis.errors import redis_errors

    if isinstance(exc, str):
        cls = getattr(rx, exc)
        exc = cls("3999 127.0.0.1:7000") if cls in (rx.MovedError, rx.AskError) else cls("x")
    with pytest.raises(StoreUnavailable) as mapped:
        with redis_errors():
            raise exc
    assert mapped.value.retry_after >= 1
    assert store_error_status(mapped.value) == 503


async def test_a_command_that_failed_before_it_was_sent_is_tried_once_more() -> None:
    from redis import exceptions as rx

    from relay.store.redis.errors import retry_unsent

    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the handler is closed")
        return "ok"

    assert await retry_unsent(flaky) == "ok"
    assert len(calls) == 2

    async def refused() -> str:  # may have been sent: not retried here
        calls.append(1)
        raise rx.ConnectionError("refused")

    calls.clear()
    with pytest.raises(rx.ConnectionError):
        await retry_unsent(refused)
    assert len(calls) == 1


# ------------------------------------------------------- more requests than connections
CROWD = 150  # concurrent publishes, more than the relay's POOL_SIZE (64) Redis connections
STREAMS = 90  # concurrent SSE opens besides: more than POOL_SIZE, under the 100 per client


async def _status_of(port: int, request: bytes, hold: asyncio.Event | None = None) -> bytes:
    """Send one raw HTTP request; its status line (an SSE stream stays open until `hold`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if hold is not None and head.startswith(b"HTTP/1.1 200"):
            seen = b""
            while b": keep-alive" not in seen:  # the replay is over, the stream is live
                chunk = await reader.read(65536)
                assert chunk, "the stream ended"
                seen = seen[-64:] + chunk
            await hold.wait()
        return head.split(b"\r\n")[0]
    finally:
        writer.close()


@pytest.mark.slow
@pytest.mark.parametrize("acked", [0, 1])
async def test_more_concurrent_requests_than_pooled_connections_all_succeed(
    request: pytest.FixtureRequest, acked: int
) -> None:
    """Past POOL_SIZE requests in flight a request waits for a Cluster connection (as
    the standalone pool does) instead of answering 503 (redis-py's MaxConnectionsError;
    with MIN_REPLICAS, the slot node's pool's "Too many connections")."""
    cluster: RedisCluster = request.getfixturevalue("replicated" if acked else "redis_cluster")
    cluster.flush()
    env = {**relay_env(cluster.url), "HIVE_RELAY_REDIS_MIN_REPLICAS": str(acked)}
    if acked:
        env["HIVE_RELAY_REDIS_WAIT_MS"] = "5000"
    with RelayProcess(env=env) as relay:
        ws = f"crowd{acked}"
        opened = asyncio.Event()
        sse = f"GET /v1/workspaces/{ws}/events?bodies=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        streams = [asyncio.create_task(_status_of(relay.port, sse, opened)) for _ in range(STREAMS)]

        def post(i: int) -> bytes:
            body = json.dumps({"n": i}).encode()
            return (
                f"POST /v1/workspaces/{ws}/envelopes HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode() + body

        async with asyncio.timeout(WAIT * 4):
            posts = await asyncio.gather(*(_status_of(relay.port, post(i)) for i in range(CROWD)))
            opened.set()
            heads = await asyncio.gather(*streams)
        assert posts == [b"HTTP/1.1 200 OK"] * CROWD
        assert heads == [b"HTTP/1.1 200 OK"] * STREAMS
        async with httpx.AsyncClient(base_url=relay.url, timeout=WAIT) as c:
            r = await c.get(f"/v1/workspaces/{ws}/envelopes", params={"limit": CROWD + 10})
        assert r.status_code == 200, r.text
        assert sorted(row["body"]["n"] for row in r.json()) == list(range(CROWD))
        assert "MaxConnectionsError" not in relay.logs()
        assert "Traceback" not in relay.logs()


async def test_a_cluster_request_waits_for_a_place_bounded_and_never_twice() -> None:
    """The Cluster client's wait for a connection: a request past the limit waits,
    gets the place once one is free, fails as 503 after the bound (as the standalone
    pool's "No connection available"), and redis-py's nested calls take no second place."""
    from redis import exceptions as rx
    from redis.asyncio.cluster import ClusterNode

    from relay.store.redis.connect import _WaitingCluster
    from relay.store.redis.errors import redis_errors

    client = _WaitingCluster(startup_nodes=[ClusterNode("127.0.0.1", 1)], limit=1, wait=0.2)
    freed = asyncio.Event()

    async def hold() -> None:
        async with client.place():
            async with client.place():  # nested (a retry inside a command): no deadlock
                await freed.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    with pytest.raises(StoreUnavailable):
        with redis_errors():
            async with client.place():
                pass
    with pytest.raises(rx.ConnectionError, match="No connection available"):
        async with client.place():
            pass

    async def wait_one() -> bool:
        async with client.place():
            return True

    waiter = asyncio.create_task(wait_one())
    await asyncio.sleep(0)
    assert not waiter.done()  # waiting, not refused
    freed.set()
    await holder
    assert await asyncio.wait_for(waiter, WAIT)  # got the freed place


@pytest.mark.slow
async def test_sse_clients_that_leave_mid_replay_end_quietly(redis_cluster: RedisCluster) -> None:
    """A stream whose client hangs up while its replay reads the Cluster is cancelled
    and ends without an error (it used to log a CancelledError traceback each time)."""
    redis_cluster.flush()
    with RelayProcess(env=relay_env(redis_cluster.url)) as relay:
        async with httpx.AsyncClient(base_url=relay.url, timeout=WAIT) as c:
            rows = [{"i": i, "pad": "x" * 900} for i in range(150)]
            r = await c.post("/v1/workspaces/leavers/envelopes/batch", json=rows)
            assert r.status_code == 200, r.text
            sse = b"GET /v1/workspaces/leavers/events?bodies=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            for _ in range(3):
                heads = await asyncio.gather(*(_status_of(relay.port, sse) for _ in range(60)))
                assert heads == [b"HTTP/1.1 200 OK"] * 60
        async with asyncio.timeout(WAIT):  # every stream has ended (its access line)
            while relay.logs().count("route=/v1/workspaces/{ws}/events") < 180:
                await asyncio.sleep(0.05)
        logs = relay.logs()
        assert "Traceback" not in logs and "CancelledError" not in logs
