"""RelayClient and AsyncRelayClient against a real relay: every call, every typed error.

Each test body runs twice, once with the sync client and once with the async
client driven through a blocking portal, so the two stay identical.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from client import (
    AsyncRelayClient,
    BadRequest,
    BadResponse,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayClient,
    RelayError,
    Unauthorized,
    Unavailable,
    Unreachable,
    Unsupported,
)
from client.wire import GapNotice, Nudge
from tests.client.support import TokenSigner, new_workspace_id
from tests.conftest import FIXTURES
from tests.relayproc import RelayProcess, free_port

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

HIVE_BODIES = sorted((FIXTURES / "hive_envelopes").glob("*.json"))


class Blocking:
    """An AsyncRelayClient whose coroutine methods are called through a blocking portal."""

    def __init__(self, client: AsyncRelayClient, portal: BlockingPortal) -> None:
        self._client = client
        self._portal = portal

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._portal.call(functools.partial(method, *args, **kwargs))

        return call


Factory = Callable[..., Any]


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as p:
        yield p


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest, portal: BlockingPortal) -> Iterator[Factory]:
    """`make_client(url, token=None, **kw)`: a RelayClient, or a portal-driven AsyncRelayClient."""
    made: list[Any] = []

    def make(url: str, token: str | None = None, **kwargs: Any) -> Any:
        if request.param == "sync":
            client = RelayClient(url, token, **kwargs)
            made.append(client.close)
            return client
        aclient = AsyncRelayClient(url, token, **kwargs)
        made.append(lambda: portal.call(aclient.aclose))
        return Blocking(aclient, portal)

    yield make
    for close in made:
        close()


@pytest.fixture
def api(make_client: Factory, relay: RelayProcess) -> Any:
    return make_client(relay.url)


# --------------------------------------------------------------------------- core calls


def test_health(api: Any) -> None:
    assert api.health() is True


def test_push_and_fetch(api: Any, ws_id: str) -> None:
    first = api.push(ws_id, {"n": 1})
    second = api.push(ws_id, b'{"n":2}')
    assert second.seq > first.seq and not first.duplicate
    page = api.fetch(ws_id)
    assert [(r.seq, json.loads(r.body)) for r in page.rows] == [
        (first.seq, {"n": 1}),
        (second.seq, {"n": 2}),
    ]
    assert page.head == second.seq and page.oldest == first.seq
    assert page.epoch and not page.gap and not page.more
    assert page.last_seq == second.seq
    assert api.fetch(ws_id, first.seq).rows[0].seq == second.seq
    assert api.fetch(ws_id, second.seq).rows == []


def test_unknown_workspace_is_empty(api: Any, ws_id: str) -> None:
    page = api.fetch(ws_id)
    assert page.rows == [] and page.head == 0 and page.last_seq is None


def test_idempotency_key_deduplicates(api: Any, ws_id: str) -> None:
    a = api.push(ws_id, {"n": 1}, idempotency_key="k-1")
    again = api.push(ws_id, {"n": 1}, idempotency_key="k-1")
    other = api.push(ws_id, {"n": 1}, idempotency_key="k-2")
    assert again.seq == a.seq and again.duplicate
    assert other.seq != a.seq and not other.duplicate
    assert len(api.fetch(ws_id).rows) == 2


@pytest.mark.parametrize("path", HIVE_BODIES, ids=lambda p: p.name)
def test_hive_bodies_come_back_byte_for_byte(api: Any, ws_id: str, path: Any) -> None:
    raw = path.read_bytes()
    api.push(ws_id, raw)
    [row] = api.fetch(ws_id).rows
    assert row.body == raw.strip()


def test_push_batch(api: Any, ws_id: str) -> None:
    seqs = api.push_batch(ws_id, [{"i": 0}, b'{"i":1}', {"i": 2}], idempotency_keys=["a", "b", "c"])
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert (
        api.push_batch(ws_id, [{"i": 0}, b'{"i":1}', {"i": 2}], idempotency_keys=["a", "b", "c"])
        == seqs
    )
    assert [r.seq for r in api.fetch(ws_id).rows] == seqs
    with pytest.raises(ValueError):
        api.push_batch(ws_id, [])
    with pytest.raises(ValueError):
        api.push_batch(ws_id, [{}], idempotency_keys=["a", "b"])


def test_fetch_limit_and_more(api: Any, ws_id: str) -> None:
    seqs = api.push_batch(ws_id, [{"i": i} for i in range(5)])
    page = api.fetch(ws_id, limit=2)
    assert [r.seq for r in page.rows] == seqs[:2] and page.more
    rest = api.fetch(ws_id, page.last_seq, limit=10)
    assert [r.seq for r in rest.rows] == seqs[2:] and not rest.more


def test_keyring(api: Any, ws_id: str) -> None:
    assert api.get_keyring(ws_id) == []
    api.post_keyring(ws_id, {"version": 1, "sealed": {}})
    api.post_keyring(ws_id, b'{"version":2,"sealed":{}}')
    blobs = api.get_keyring(ws_id)
    assert [json.loads(b)["version"] for b in blobs] == [1, 2]
    assert blobs[1] == b'{"version":2,"sealed":{}}'


def test_presence_and_candidates(api: Any, ws_id: str) -> None:
    api.put_presence(ws_id, "dev-1", {"name": "laptop"})
    api.put_presence(ws_id, "dev-1", {"name": "laptop", "online": True})
    api.put_presence(ws_id, "dev-2", None)
    assert api.get_presence(ws_id) == {"dev-1": {"name": "laptop", "online": True}, "dev-2": None}
    api.put_candidates(ws_id, "dev-1", ["udp 10.0.0.1 4242"])
    assert api.get_candidates(ws_id) == {"dev-1": ["udp 10.0.0.1 4242"]}


def test_pairing(api: Any) -> None:
    made = api.create_pairing("invite-payload", ttl_secs=60)
    assert len(made.code) == 6 and 30 <= made.expires_in <= 60
    assert api.resolve_pairing(made.code) == "invite-payload"
    sloppy = f"{made.code[:3].lower()}-{made.code[3:].lower()}"
    assert api.resolve_pairing(sloppy) == "invite-payload"
    with pytest.raises(NotFound) as info:
        api.resolve_pairing("000000" if made.code != "000000" else "111111")
    assert info.value.status == 404


# --------------------------------------------------------------------------- real relay errors


def test_bad_request(api: Any, ws_id: str) -> None:
    with pytest.raises(BadRequest) as info:
        api.push(ws_id, b"{not json")
    assert info.value.status == 400 and info.value.code
    with pytest.raises(ValueError):
        api.fetch("bad workspace id!")


def test_unreachable(make_client: Factory) -> None:
    api = make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unreachable) as info:
        api.fetch(new_workspace_id())
    assert info.value.status is None and info.value.retryable


@pytest.fixture(scope="module")
def signer() -> TokenSigner:
    return TokenSigner()


@pytest.fixture(scope="module")
def signed_relay(signer: TokenSigner) -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_TOKEN_PUBKEY": signer.pubkey_hex}) as proc:
        yield proc


def test_unauthorized_and_forbidden(
    make_client: Factory, signed_relay: RelayProcess, signer: TokenSigner
) -> None:
    token = signer.token(ws=["team-*"])
    granted = make_client(signed_relay.url, token)
    assert granted.push("team-a", {"ok": 1}).seq > 0
    with pytest.raises(Forbidden) as forbidden:
        granted.fetch("elsewhere")
    assert forbidden.value.status == 403
    for bad in (None, "not-a-token", token[:-4] + "AAAA"):
        with pytest.raises(Unauthorized) as unauthorized:
            make_client(signed_relay.url, bad).fetch("team-a")
        assert unauthorized.value.status == 401 and not unauthorized.value.retryable
    assert make_client(signed_relay.url).health() is True  # health is never gated


@pytest.fixture
def strict_relay() -> Iterator[RelayProcess]:
    """Its push budget is per client address: each test needs a fresh one."""
    env = {
        "HIVE_RELAY_MAX_BODY_BYTES": "1024",
        "HIVE_RELAY_PUSH_RATE": "0.001",
        "HIVE_RELAY_PUSH_BURST": "3",
    }
    with RelayProcess(env=env) as proc:
        yield proc


def test_too_large_and_rate_limited(make_client: Factory, strict_relay: RelayProcess) -> None:
    api = make_client(strict_relay.url)
    ws = new_workspace_id()
    with pytest.raises(PayloadTooLarge) as too_large:
        api.push(ws, {"pad": "x" * 2000})
    assert too_large.value.status == 413
    with pytest.raises(RateLimited) as limited:
        for i in range(10):
            api.push(ws, {"i": i})
    assert limited.value.status == 429 and limited.value.retryable
    assert limited.value.retry_after is not None and limited.value.retry_after > 0


# --------------------------------------------------------------------------- event streams


def test_sync_event_stream(relay: RelayProcess, ws_id: str) -> None:
    with RelayClient(relay.url) as api:
        first = api.push(ws_id, {"n": 1}).seq
        with api.events(ws_id, bodies=True, after=0) as stream:
            assert stream.info.head == first and stream.info.epoch
            for item in stream:
                assert not isinstance(item, Nudge | GapNotice)
                assert (item.seq, json.loads(item.body)) == (first, {"n": 1})
                break
        with api.events(ws_id) as stream:
            for item in stream:
                assert item == Nudge(seq=first)
                break


@pytest.mark.anyio
async def test_async_event_stream(relay: RelayProcess, ws_id: str) -> None:
    async with AsyncRelayClient(relay.url) as api:
        with anyio.fail_after(10):
            async with api.events(ws_id, bodies=True) as stream:
                pushed = await api.push(ws_id, {"live": True})
                async for item in stream:
                    assert not isinstance(item, Nudge | GapNotice)
                    assert item.seq == pushed.seq
                    break


@pytest.mark.anyio
async def test_long_poll_returns_when_a_row_arrives(relay: RelayProcess, ws_id: str) -> None:
    async with AsyncRelayClient(relay.url) as api:
        results = []

        async def poll() -> None:
            results.append(await api.fetch(ws_id, wait=30))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                await anyio.sleep(0.05)
                pushed = await api.push(ws_id, {"woke": True})
        assert [r.seq for r in results[0].rows] == [pushed.seq]


# --------------------------------------------------------------------------- mapping, offline


def mock_client(
    kind: str, handler: Callable[[httpx.Request], httpx.Response], portal: BlockingPortal, **kw: Any
) -> Any:
    if kind == "sync":
        return RelayClient("http://relay.test", transport=httpx.MockTransport(handler), **kw)
    return Blocking(
        AsyncRelayClient("http://relay.test", transport=httpx.MockTransport(handler), **kw), portal
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("status", "headers", "body", "expected", "retry_after"),
    [
        (
            503,
            {"retry-after": "7"},
            b'{"error":"store_unavailable","message":"down"}',
            Unavailable,
            7.0,
        ),
        (502, {}, b"<html>bad gateway</html>", Unavailable, None),
        (429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"{}", RateLimited, 0.0),
        (418, {}, b'{"error":"teapot","message":"short and stout"}', RelayError, None),
        (404, {}, b"", NotFound, None),
    ],
)
def test_error_mapping(
    kind: str,
    portal: BlockingPortal,
    status: int,
    headers: dict[str, str],
    body: bytes,
    expected: type[RelayError],
    retry_after: float | None,
) -> None:
    api = mock_client(kind, lambda r: httpx.Response(status, headers=headers, content=body), portal)
    with pytest.raises(expected) as info:
        api.fetch("ws")
    err = info.value
    assert type(err) is expected and err.status == status and err.retry_after == retry_after
    assert err.message
    if body.startswith(b'{"error"'):
        assert err.code == json.loads(body)["error"] and err.code in str(err)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, b'{"rows": []}'),
        ({}, b'[{"seq": -1, "body": {}}]'),
        ({}, b'[{"seq": 2, "body": 1}, {"seq": 1, "body": 2}]'),
        ({"x-relay-head": "lots"}, b"[]"),
        ({}, b"not json"),
    ],
)
def test_malformed_answers_are_bad_responses(
    kind: str, portal: BlockingPortal, headers: dict[str, str], body: bytes
) -> None:
    api = mock_client(kind, lambda r: httpx.Response(200, headers=headers, content=body), portal)
    with pytest.raises(BadResponse):
        api.fetch("ws")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_requests_carry_token_key_and_wait_timeout(kind: str, portal: BlockingPortal) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(200, json={"seq": 5})
        return httpx.Response(200, json=[])

    api = mock_client(kind, handler, portal, token="s3cret", timeout=3.0)
    api.push("ws", {"a": 1}, idempotency_key="idem-1")
    api.fetch("ws", 7, limit=3, wait=20)
    push, fetch = seen
    assert push.headers["authorization"] == "Bearer s3cret"
    assert push.headers["idempotency-key"] == "idem-1"
    assert push.headers["content-type"] == "application/json"
    assert push.content == b'{"a":1}'
    assert dict(fetch.url.params) == {"after": "7", "limit": "3", "wait": "20"}
    # The relay may hold a long-poll for `wait` seconds: the read timeout outlasts it.
    assert fetch.extensions["timeout"]["read"] >= 23


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_health_reports_store_unavailable(kind: str, portal: BlockingPortal) -> None:
    api = mock_client(kind, lambda r: httpx.Response(503, text="store unavailable"), portal)
    assert api.health() is False


@pytest.mark.parametrize("status", [404, 405])
def test_missing_event_stream_is_unsupported(status: int) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(status, json={"error": "x"}))
    with RelayClient("http://relay.test", transport=transport) as api:
        with pytest.raises(Unsupported) as info:
            with api.events("ws", bodies=True):
                pass
    assert info.value.status == status


def test_a_json_answer_is_not_an_event_stream() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"seq": 1}))
    with RelayClient("http://relay.test", transport=transport) as api:
        with pytest.raises(Unsupported, match="not an event stream"):
            with api.events("ws"):
                pass


def test_event_stream_parsing() -> None:
    stream_text = (
        ": connected\n\n"
        'event: gap\ndata: {"oldest":10}\n\n'
        'id: 11\ndata: {"seq":11,"body":{"a":[1, 2]}}\n\n'
        'data: {"seq":12}\n\n'
        "event: other\ndata: ignored\n\n"
    )
    transport = httpx.MockTransport(
        lambda r: httpx.Response(
            200,
            headers={
                "content-type": "text/event-stream",
                "x-relay-epoch": "e1",
                "x-relay-head": "12",
            },
            content=stream_text.encode(),
        )
    )
    with RelayClient("http://relay.test", transport=transport) as api:
        with api.events("ws", bodies=True, after=9) as stream:
            items = list(stream)
            assert stream.info.epoch == "e1" and stream.info.head == 12
    assert items[0] == GapNotice(oldest=10)
    assert (items[1].seq, items[1].body) == (11, b'{"a":[1, 2]}')
    assert items[2] == Nudge(seq=12)
    assert len(items) == 3


def test_client_validates_arguments() -> None:
    with pytest.raises(ValueError, match="http"):
        RelayClient("relay.example.com")
    with RelayClient(
        "http://relay.test", transport=httpx.MockTransport(lambda r: httpx.Response(200))
    ) as api:
        for bad in ("", "a b", "x" * 201, "slash/inside"):
            with pytest.raises(ValueError):
                api.fetch(bad)
        with pytest.raises(ValueError):
            api.fetch("ws", -1)
        with pytest.raises(ValueError):
            api.fetch("ws", wait=61)
        with pytest.raises(ValueError):
            api.push("ws", {}, idempotency_key="café")  # the relay's rule: visible ASCII
