"""The SDK follows the relay's side-channel paging, checks idempotency keys before sending,
and maps the relay's newer refusals (side/pairing rate limits, relay_full).

Against a real relay process with a small HIVE_RELAY_MAX_PAGE_BYTES, so every keyring
and device-map read below really spans several pages; the sync and async clients run
the same test bodies (see test_relay_client's `make_client`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal

from client import (
    BadResponse,
    Device,
    PayloadTooLarge,
    RateLimited,
    RelayClient,
    RelayFull,
    SyncWorkspace,
    Workspace,
    parse_envelope,
)
from client import _requests as rq
from tests.client import test_relay_client as shared
from tests.client.conftest import OPEN_RELAY_ENV
from tests.client.support import FAST, new_workspace_id
from tests.client.test_client_cli import cli
from tests.client.test_relay_client import Factory, mock_client
from tests.relayproc import RelayProcess

# The sync/async client factory and the portal it drives async clients through.
make_client = shared.make_client
portal = shared.portal

PAGE_BYTES = 600
PASSPHRASE = "side paging passphrase"


@pytest.fixture(scope="module")
def paged_relay() -> Iterator[RelayProcess]:
    """A relay whose side-channel answers hold at most PAGE_BYTES of entries."""
    env = {
        **OPEN_RELAY_ENV,
        "HIVE_RELAY_MAX_PAGE_BYTES": str(PAGE_BYTES),
        "HIVE_RELAY_SIDE_RATE": "0",
    }
    with RelayProcess(env=env) as proc:
        yield proc


def raw_get(relay: RelayProcess, path: str) -> httpx.Response:
    return httpx.get(f"{relay.url}/v1/workspaces/{path}", timeout=10)


# --------------------------------------------------------------------------- paging


@pytest.mark.slow
def test_the_keyring_is_read_across_pages_oldest_first(
    make_client: Factory, paged_relay: RelayProcess
) -> None:
    api = make_client(paged_relay.url)
    ws = new_workspace_id()
    blobs = [{"n": n, "pad": "k" * 90} for n in range(40)]
    for blob in blobs:
        api.post_keyring(ws, blob)
    first = raw_get(paged_relay, f"{ws}/keyring")
    assert first.headers["x-relay-more"] == "true"  # the relay really pages this keyring
    assert len(first.json()) < len(blobs) // 4
    got = [httpx.Response(200, content=b).json() for b in api.get_keyring(ws)]
    assert got == blobs


@pytest.mark.slow
def test_presence_and_candidates_are_merged_across_pages(
    make_client: Factory, paged_relay: RelayProcess
) -> None:
    api = make_client(paged_relay.url)
    ws = new_workspace_id()
    # Ids that need percent-encoding in X-Relay-Next: spaces, '+', '&', '=', '/', non-ASCII.
    ids = [f"dev {n:02d}/é+&={n}" for n in range(30)] + ["zz☃", "a%2F", "A"]
    for n, device in enumerate(ids):
        api.put_presence(ws, device, {"n": n, "pad": "p" * 40})
        api.put_candidates(ws, device, [f"10.0.0.{n}:4000", "c" * 40])
    for channel in ("presence", "candidates"):
        first = raw_get(paged_relay, f"{ws}/{channel}")
        assert first.headers["x-relay-more"] == "true"
        assert len(first.json()) < len(ids) // 3
    presence = api.get_presence(ws)
    assert presence == {d: {"n": n, "pad": "p" * 40} for n, d in enumerate(ids)}
    assert api.get_candidates(ws) == {d: [f"10.0.0.{n}:4000", "c" * 40] for n, d in enumerate(ids)}


@pytest.mark.slow
def test_an_unpaged_map_is_one_request(make_client: Factory, paged_relay: RelayProcess) -> None:
    api = make_client(paged_relay.url)
    ws = new_workspace_id()
    api.put_presence(ws, "only", {"up": True})
    assert "x-relay-more" not in raw_get(paged_relay, f"{ws}/presence").headers
    assert api.get_presence(ws) == {"only": {"up": True}}
    assert api.get_keyring(ws) == []


def bury_rotation(relay: RelayProcess, ws: str, devices: dict[str, Device]) -> None:
    """Rotate to epoch 1 for `devices`, then post enough newer blobs that the rotation is
    only on an older keyring page."""
    with SyncWorkspace(relay.url, ws, PASSPHRASE, device=devices["alice"], **FAST) as alice:
        assert alice.rotate({d.device_id: d.public_key for d in devices.values()}) == 1
    with httpx.Client(base_url=f"{relay.url}/v1/workspaces/{ws}") as http:
        for n in range(12):
            assert http.post("/keyring", json={"other": n, "pad": "x" * 100}).status_code == 200
        first = http.get("/keyring")
    assert first.headers["x-relay-more"] == "true"
    assert all("other" in blob for blob in first.json())  # the rotation is not on page 1


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_workspace_adopts_an_epoch_only_on_an_older_page(
    paged_relay: RelayProcess,
) -> None:
    ws = new_workspace_id()
    devices = {name: Device.generate(name) for name in ("alice", "bob")}
    bury_rotation(paged_relay, ws, devices)
    async with Workspace(paged_relay.url, ws, PASSPHRASE, device=devices["bob"], **FAST) as bob:
        seq = await bob.send({"hello": "bob"})
        assert bob.keyring.epochs == (0, 1)
        row = (await bob.client.fetch(ws)).rows
    assert [r.seq for r in row] == [seq]
    assert parse_envelope(row[0].body).epoch == 1


@pytest.mark.slow
def test_a_sync_workspace_adopts_an_epoch_only_on_an_older_page(
    paged_relay: RelayProcess,
) -> None:
    ws = new_workspace_id()
    devices = {name: Device.generate(name) for name in ("alice", "bob")}
    bury_rotation(paged_relay, ws, devices)
    with SyncWorkspace(paged_relay.url, ws, PASSPHRASE, device=devices["bob"], **FAST) as bob:
        assert bob.refresh_keyring() == [1]
        assert bob.keyring.current_epoch == 1
        seq = bob.send({"hello": "sync bob"})
    with RelayClient(paged_relay.url) as api:
        rows = api.fetch(ws).rows
    assert [r.seq for r in rows] == [seq]
    assert parse_envelope(rows[0].body).epoch == 1


def side_answers(pages: list[tuple[dict[str, str], bytes]]) -> tuple[list[httpx.Request], Any]:
    """A transport handler that answers GETs with `pages` in turn (the last one forever)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers, body = pages[min(len(seen), len(pages)) - 1]
        return httpx.Response(200, headers=headers, content=body)

    return seen, handler


MORE = {"x-relay-more": "true"}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("method", "pages", "says"),
    [
        # A next that does not move: the same page again and again.
        ("get_keyring", [({**MORE, "x-relay-next": "before=3"}, b"[1]")], "does not move"),
        (
            "get_keyring",
            [
                ({**MORE, "x-relay-next": "before=3"}, b"[1]"),
                ({**MORE, "x-relay-next": "before=5"}, b"[2]"),
            ],
            "does not move",
        ),
        ("get_keyring", [({**MORE, "x-relay-next": "before=0"}, b"[1]")], "does not move"),
        ("get_presence", [({**MORE, "x-relay-next": "after=a"}, b'{"a":1}')], "does not move"),
        (
            "get_candidates",
            [
                ({**MORE, "x-relay-next": "after=b"}, b'{"b":1}'),
                ({**MORE, "x-relay-next": "after=a"}, b"{}"),
            ],
            "does not move",
        ),
        ("get_presence", [(MORE, b'{"a":1}')], "no X-Relay-Next"),
        ("get_keyring", [({"x-relay-next": "after=a"}, b"[1]")], "before="),
        ("get_keyring", [({"x-relay-next": "before=-1"}, b"[1]")], "not a count"),
        ("get_keyring", [({"x-relay-next": "before=%C2%B2"}, b"[1]")], "not a count"),
        ("get_presence", [({"x-relay-next": "after="}, b"{}")], "after="),
        ("get_presence", [({"x-relay-next": "after=%FF"}, b"{}")], "percent-encoded UTF-8"),
    ],
)
def test_a_relay_that_loops_or_garbles_paging_is_a_bad_response(
    kind: str, portal: BlockingPortal, method: str, pages: Any, says: str
) -> None:
    seen, handler = side_answers(pages)
    api = mock_client(kind, handler, portal)
    with pytest.raises(BadResponse) as info:
        getattr(api, method)("ws")
    assert says in str(info.value)
    assert len(seen) <= 3


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_paging_stops_after_max_side_pages(
    kind: str, portal: BlockingPortal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rq, "MAX_SIDE_PAGES", 5)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        n = len(seen)
        # Moving forward forever: after=00001, after=00002, ...
        return httpx.Response(
            200, headers={**MORE, "x-relay-next": f"after={n:05d}"}, content=b"{}"
        )

    api = mock_client(kind, handler, portal)
    with pytest.raises(BadResponse, match="past 5 pages"):
        api.get_presence("ws")
    assert len(seen) == 5
    assert [r.url.params.get("after") for r in seen] == [None, "00001", "00002", "00003", "00004"]


# --------------------------------------------------------------------------- idempotency keys

BAD_KEYS = ["café", "", " ", "with space", "tab\t", "x" * 201, "é" * 10, "\x7f"]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_key_outside_the_rule_is_refused_before_sending(
    kind: str, portal: BlockingPortal, key: str
) -> None:
    seen, handler = side_answers([({}, b'{"seq":1}')])
    api = mock_client(kind, handler, portal)
    with pytest.raises(ValueError, match="visible ASCII"):
        api.push("ws", {"n": 1}, idempotency_key=key)
    with pytest.raises(ValueError, match="visible ASCII"):
        api.push_batch("ws", [{"n": 1}, {"n": 2}], idempotency_keys=["fine", key])
    assert seen == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_comma_is_refused_only_in_batch_keys(kind: str, portal: BlockingPortal) -> None:
    seen, handler = side_answers([({}, b'{"seq":1}')])
    api = mock_client(kind, handler, portal)
    with pytest.raises(ValueError, match="comma"):
        api.push_batch("ws", [{"n": 1}, {"n": 2}], idempotency_keys=["a,b", "c"])
    assert seen == []
    # One push's key may hold a comma, as the relay's rule allows.
    api.push("ws", {"n": 1}, idempotency_key="a,b")
    assert [r.headers["idempotency-key"] for r in seen] == ["a,b"]


@pytest.mark.slow
def test_keys_inside_the_rule_reach_the_relay(
    make_client: Factory, paged_relay: RelayProcess
) -> None:
    api = make_client(paged_relay.url)
    ws = new_workspace_id()
    edge = "".join(chr(c) for c in range(0x21, 0x7F)) + "~" * 106  # every allowed char, 200 long
    assert len(edge) == 200
    first = api.push(ws, {"n": 1}, idempotency_key=edge)
    again = api.push(ws, {"n": 1}, idempotency_key=edge)
    assert again.seq == first.seq and again.duplicate
    seqs = api.push_batch(ws, [{"n": 2}, {"n": 3}], idempotency_keys=["!", "~" * 200])
    assert len(seqs) == 2 and first.seq < seqs[0] < seqs[1]
    for key in ("café", " "):
        with pytest.raises(ValueError):
            api.push(ws, {"n": 4}, idempotency_key=key)
    assert [r.seq for r in api.fetch(ws).rows] == [first.seq, *seqs]  # nothing more appended


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_relay_full_is_its_own_error(kind: str, portal: BlockingPortal) -> None:
    body = b'{"error":"relay_full","message":"the relay holds as many workspaces as it can"}'
    api = mock_client(kind, lambda r: httpx.Response(413, content=body), portal)
    with pytest.raises(RelayFull) as info:
        api.push("ws", {"n": 1})
    err = info.value
    assert isinstance(err, PayloadTooLarge) and err.status == 413 and err.code == "relay_full"
    assert not err.retryable and "as many workspaces" in str(err)
    # Any other 413 stays a plain PayloadTooLarge.
    other = b'{"error":"payload_too_large","message":"too big"}'
    api = mock_client(kind, lambda r: httpx.Response(413, content=other), portal)
    with pytest.raises(PayloadTooLarge) as plain:
        api.push("ws", {"n": 1})
    assert type(plain.value) is PayloadTooLarge


@pytest.mark.slow
def test_a_full_relay_refuses_a_new_workspace_with_relay_full(make_client: Factory) -> None:
    with RelayProcess(env={**OPEN_RELAY_ENV, "HIVE_RELAY_MAX_BYTES": "1024"}) as small:
        api = make_client(small.url)
        with pytest.raises(RelayFull) as info:
            for n in range(200):
                api.push(f"full-{n}", {"n": n})
        assert info.value.status == 413 and info.value.code == "relay_full"
        # The CLI does not suggest a larger body limit: the relay is out of room.
        env = {"HIVE_RELAY_URL": small.url, "HIVE_WORKSPACE": "full-new", "HIVE_WORKSPACE_KEY": "k"}
        result = cli("send", '{"n": 1}', env=env)
    assert result.returncode != 0
    assert "out of room" in result.stderr and "HIVE_RELAY_MAX_BYTES" in result.stderr
    assert (
        "max_body_bytes" not in result.stderr and "HIVE_RELAY_MAX_BODY_BYTES" not in result.stderr
    )


@pytest.mark.slow
def test_side_and_pairing_rate_limits_are_rate_limited(make_client: Factory) -> None:
    env = {
        **OPEN_RELAY_ENV,
        "HIVE_RELAY_SIDE_RATE": "0.001",
        "HIVE_RELAY_SIDE_BURST": "2",
        "HIVE_RELAY_PAIR_CREATE_RATE": "0.001",
    }
    with RelayProcess(env=env) as strict:
        api = make_client(strict.url)
        ws = new_workspace_id()
        with pytest.raises(RateLimited) as side:
            for n in range(5):
                api.put_presence(ws, f"d{n}", {"n": n})
        with pytest.raises(RateLimited) as pair:
            for _ in range(15):
                api.create_pairing("payload")
    for err, code in ((side.value, "side_rate_limited"), (pair.value, "pair_create_rate_limited")):
        assert err.status == 429 and err.code == code and err.retryable
        assert err.retry_after is not None and err.retry_after > 0
