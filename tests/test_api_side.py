"""Workspace side channels (keyring, presence, candidates) and pairing codes over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

import relay.limits
import relay.store.memory
from relay.api.side import DEVICE_BODY_EXTRA
from tests.support import FakeTime, assert_error
from tests.support import make_unlimited_client as make_client

WS = "b7d0c5a2-91e4-4f0e-8d7c-2a6b3c4d5e6f"
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CHANNELS = ("presence", "candidates")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def url(channel: str, ws: str = WS) -> str:
    return f"/v1/workspaces/{ws}/{channel}"


def stats(c: TestClient) -> Any:
    return c.app.state.relay.store.stats_now()  # type: ignore[attr-defined]


@pytest.fixture
def store_clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(relay.store.memory, "time", fake)
    return fake


@pytest.fixture
def limiter_clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(relay.limits, "time", SimpleNamespace(monotonic=lambda: clock.now))
    return clock


# -------------------------------------------------------------------- keyring
def post_keyring(c: TestClient, blob: bytes, ws: str = WS) -> None:
    r = c.post(url("keyring", ws), content=blob)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True}


def test_keyring_appends_and_lists_oldest_first_byte_for_byte(client: TestClient) -> None:
    blobs = [b'{"version":1,"epoch":1}', b" [1, 2 ,3] ", b'"sealed"', b'{"version":1,"epoch":1}']
    for blob in blobs:
        post_keyring(client, blob)
    r = client.get(url("keyring"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    # Every blob is kept (identical ones too), in order, exactly as sent.
    assert r.content == b"[" + b",".join(blobs) + b"]"
    assert r.json() == [{"version": 1, "epoch": 1}, [1, 2, 3], "sealed", {"version": 1, "epoch": 1}]


def test_keyring_of_unknown_workspace_is_empty(client: TestClient) -> None:
    r = client.get(url("keyring", "nobody-here"))
    assert r.status_code == 200
    assert r.json() == []


def test_keyrings_are_per_workspace(client: TestClient) -> None:
    post_keyring(client, b"1", ws="a")
    post_keyring(client, b"2", ws="b")
    assert client.get(url("keyring", "a")).json() == [1]
    assert client.get(url("keyring", "b")).json() == [2]


@pytest.mark.parametrize("blob", [b"", b'{"a":', b"NaN", b'"\xff"', b"1 2"])
def test_keyring_invalid_json_is_400_and_nothing_changes(client: TestClient, blob: bytes) -> None:
    post_keyring(client, b'"first"')
    r = client.post(url("keyring"), content=blob)
    assert_error(r, 400, "invalid_json")
    assert client.get(url("keyring")).json() == ["first"]


def test_keyring_full_is_413() -> None:
    with make_client(max_keyring=2) as c:
        post_keyring(c, b"1")
        post_keyring(c, b"2")
        r = c.post(url("keyring"), content=b"3")
        assert_error(r, 413, "keyring_full")
        assert c.get(url("keyring")).json() == [1, 2]
        # The bound is per workspace.
        post_keyring(c, b"3", ws="other")


def test_keyring_blob_over_max_side_bytes_is_413() -> None:
    with make_client(max_side_bytes=64) as c:
        at_limit = b'"' + b"k" * 62 + b'"'
        post_keyring(c, at_limit)
        r = c.post(url("keyring"), content=b'"' + b"k" * 63 + b'"')
        assert r.status_code == 413
        assert r.json()["error"] in ("too_large", "payload_too_large")
        assert c.get(url("keyring")).content == b"[" + at_limit + b"]"


def test_keyring_body_over_max_body_bytes_is_413() -> None:
    with make_client(max_body_bytes=128) as c:
        r = c.post(url("keyring"), content=b'"' + b"k" * 200 + b'"')
        assert_error(r, 413, "payload_too_large")
        assert c.get(url("keyring")).json() == []


# ----------------------------------------------------- presence / candidates
def put(c: TestClient, channel: str, body: bytes, ws: str = WS) -> None:
    r = c.post(url(channel, ws), content=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True}


@pytest.mark.parametrize("channel", CHANNELS)
def test_device_entries_replace_per_device(client: TestClient, channel: str) -> None:
    put(client, channel, b'{"device_id":"d1","data":{"x":1}}')
    put(client, channel, b'{"device_id":"d2","data":2}')
    put(client, channel, b'{"device_id":"d1","data":{"x":3}}')
    r = client.get(url(channel))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"d1": {"x": 3}, "d2": 2}


@pytest.mark.parametrize("channel", CHANNELS)
def test_device_data_is_kept_byte_for_byte(client: TestClient, channel: str) -> None:
    put(client, channel, b'{"device_id":"d","data": {"addr" : ["10.0.0.1", 4433]} }')
    assert client.get(url(channel)).content == b'{"d":{"addr" : ["10.0.0.1", 4433]}}'


@pytest.mark.parametrize("channel", CHANNELS)
def test_device_data_omitted_is_null(client: TestClient, channel: str) -> None:
    put(client, channel, b'{"device_id":"d1"}')
    assert client.get(url(channel)).json() == {"d1": None}


@pytest.mark.parametrize("channel", CHANNELS)
def test_device_ids_are_json_encoded_in_the_map(client: TestClient, channel: str) -> None:
    odd = 'quote " back \\ newline \n unicode é \u2028'
    put(client, channel, msgspec.json.encode({"device_id": odd, "data": 1}))
    put(client, channel, msgspec.json.encode({"device_id": "d" * 200, "data": 2}))
    assert client.get(url(channel)).json() == {odd: 1, "d" * 200: 2}


def test_presence_and_candidates_are_separate(client: TestClient) -> None:
    put(client, "presence", b'{"device_id":"d","data":"p"}')
    put(client, "candidates", b'{"device_id":"d","data":"c"}')
    assert client.get(url("presence")).json() == {"d": "p"}
    assert client.get(url("candidates")).json() == {"d": "c"}
    assert client.get(url("presence", "elsewhere")).json() == {}


@pytest.mark.parametrize("channel", CHANNELS)
def test_device_map_of_unknown_workspace_is_empty(client: TestClient, channel: str) -> None:
    r = client.get(url(channel, "unknown"))
    assert r.status_code == 200
    assert r.json() == {}


BAD_DEVICE_BODIES = {
    "missing_device_id": (b'{"data":1}', "invalid_body"),
    "empty_device_id": (b'{"device_id":"","data":1}', "invalid_device_id"),
    "long_device_id": (b'{"device_id":"%b","data":1}' % (b"d" * 201), "invalid_device_id"),
    "numeric_device_id": (b'{"device_id":5,"data":1}', "invalid_body"),
    "null_device_id": (b'{"device_id":null,"data":1}', "invalid_body"),
    "array": (b'[{"device_id":"d"}]', "invalid_body"),
    "string": (b'"d"', "invalid_body"),
    "null": (b"null", "invalid_body"),
    "invalid_json": (b'{"device_id":"d",', "invalid_json"),
    "invalid_data_json": (b'{"device_id":"d","data":NaN}', "invalid_json"),
    "empty": (b"", "invalid_json"),
}


@pytest.mark.parametrize("channel", CHANNELS)
@pytest.mark.parametrize(("body", "code"), BAD_DEVICE_BODIES.values(), ids=BAD_DEVICE_BODIES.keys())
def test_device_wrong_shapes_are_400_and_nothing_changes(
    client: TestClient, channel: str, body: bytes, code: str
) -> None:
    put(client, channel, b'{"device_id":"d","data":"kept"}')
    r = client.post(url(channel), content=body)
    assert_error(r, 400, code)
    assert client.get(url(channel)).json() == {"d": "kept"}


@pytest.mark.parametrize("channel", CHANNELS)
def test_too_many_devices_is_413_but_replacing_still_works(channel: str) -> None:
    with make_client(max_devices=2) as c:
        put(c, channel, b'{"device_id":"d1","data":1}')
        put(c, channel, b'{"device_id":"d2","data":2}')
        r = c.post(url(channel), content=b'{"device_id":"d3","data":3}')
        assert_error(r, 413, "too_many_devices")
        assert c.get(url(channel)).json() == {"d1": 1, "d2": 2}
        put(c, channel, b'{"device_id":"d1","data":"new"}')
        assert c.get(url(channel)).json() == {"d1": "new", "d2": 2}


@pytest.mark.parametrize("channel", CHANNELS)
def test_device_entry_over_max_side_bytes_is_413(channel: str) -> None:
    with make_client(max_side_bytes=64) as c:
        put(c, channel, b'{"device_id":"d","data":"small"}')
        r = c.post(url(channel), content=b'{"device_id":"d","data":"%b"}' % (b"x" * 100))
        assert r.status_code == 413
        assert r.json()["error"] in ("too_large", "payload_too_large")
        assert c.get(url(channel)).json() == {"d": "small"}


@pytest.mark.parametrize("channel", CHANNELS)
def test_presence_ttl_expires_entries(channel: str) -> None:
    with make_client(presence_ttl=0.05) as c:
        put(c, channel, b'{"device_id":"d","data":1}')
        deadline = time.monotonic() + 10
        while c.get(url(channel)).json() != {}:
            assert time.monotonic() < deadline, "the presence entry never expired"
            time.sleep(0.02)


@pytest.mark.parametrize("channel", CHANNELS)
def test_presence_ttl_keeps_fresh_entries(store_clock: FakeTime, channel: str) -> None:
    with make_client(presence_ttl=60) as c:
        put(c, channel, b'{"device_id":"old","data":1}')
        store_clock.offset += 40
        put(c, channel, b'{"device_id":"new","data":2}')
        assert c.get(url(channel)).json() == {"old": 1, "new": 2}
        store_clock.offset += 30  # old is 70 s old, new 30 s
        assert c.get(url(channel)).json() == {"new": 2}
        put(c, channel, b'{"device_id":"new","data":3}')  # a refresh restarts its clock
        store_clock.offset += 50
        assert c.get(url(channel)).json() == {"new": 3}


def test_presence_never_expires_by_default(store_clock: FakeTime) -> None:
    with make_client() as c:
        put(c, "presence", b'{"device_id":"d","data":1}')
        store_clock.offset += 10 * 365 * 86400
        assert c.get(url("presence")).json() == {"d": 1}


def test_relay_wide_side_budget_refuses_with_a_4xx_and_stores_nothing() -> None:
    # PROTOCOL.md: past a side-channel bound → 413 or 429, never a 5xx (which means
    # a relay bug or an unavailable backend). max_bytes bounds side channels too.
    blob = b'"' + b"k" * 298 + b'"'
    with make_client(max_bytes=4096) as c:
        for i in range(100):
            r = c.post(url("keyring", f"ws-{i}"), content=blob)
            if r.status_code != 200:
                break
        else:
            pytest.fail("the side-channel budget never filled")
        assert r.status_code in (413, 429), (r.status_code, r.text)
        assert r.json()["error"]
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
        assert c.get(url("keyring", f"ws-{i}")).json() == []


def test_replacing_a_device_entry_works_when_the_side_budget_is_full() -> None:
    # A device refreshing its presence with an entry of the same size adds nothing,
    # so a full relay-wide budget must not refuse it.
    def entry(device: str, fill: bytes) -> bytes:
        return b'{"device_id":"%b","data":"%b"}' % (device.encode(), fill * 200)

    with make_client(max_bytes=4096) as c:
        devices = []
        for i in range(100):
            r = c.post(url("presence"), content=entry(f"d{i}", b"x"))
            if r.status_code != 200:
                break
            devices.append(f"d{i}")
        assert devices and r.status_code != 200
        put(c, "presence", entry(devices[0], b"y"))
        assert c.get(url("presence")).json()[devices[0]] == "y" * 200


# -------------------------------------------------------------------- pairing
def pair(c: TestClient, body: Any) -> dict[str, Any]:
    r = c.post("/v1/pair", content=msgspec.json.encode(body))
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_pair_create_and_resolve(client: TestClient) -> None:
    answer = pair(client, {"payload": "hello device"})
    assert set(answer) == {"code", "expires_in"}
    code = answer["code"]
    assert len(code) == 6 and all(ch in ALPHABET for ch in code)
    assert answer["expires_in"] == 600
    r = client.get(f"/v1/pair/{code}")
    assert r.status_code == 200
    assert r.json() == {"payload": "hello device"}


def test_pair_codes_use_the_alphabet_and_differ(client: TestClient) -> None:
    codes = [pair(client, {"payload": f"p{i}"})["code"] for i in range(100)]
    assert len(set(codes)) == len(codes)
    assert all(len(code) == 6 and set(code) <= set(ALPHABET) for code in codes)
    # 100 codes of 6 characters: every character of the alphabet shows up with
    # overwhelming probability (one missing has probability < 32 * (31/32)**600 < 1e-6).
    assert set("".join(codes)) == set(ALPHABET)
    for i, code in enumerate(codes):
        assert client.get(f"/v1/pair/{code}").json() == {"payload": f"p{i}"}


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [(5, 30), (0, 30), (-100, 30), (30, 30), (1000, 1000), (3600, 3600), (99999, 3600)],
)
def test_pair_ttl_is_clamped(client: TestClient, ttl: int, expected: int) -> None:
    assert pair(client, {"payload": "p", "ttl_secs": ttl})["expires_in"] == expected


def test_pair_ttl_default_is_600(client: TestClient) -> None:
    assert pair(client, {"payload": "p"})["expires_in"] == 600
    assert pair(client, {"payload": "p", "ttl_secs": None})["expires_in"] == 600


def test_pair_payload_bounds(client: TestClient) -> None:
    code = pair(client, {"payload": "x" * 8192})["code"]
    assert client.get(f"/v1/pair/{code}").json() == {"payload": "x" * 8192}
    # The bound is in UTF-8 bytes, not characters.
    code = pair(client, {"payload": "é" * 4096})["code"]
    assert client.get(f"/v1/pair/{code}").json() == {"payload": "é" * 4096}
    held = stats(client).pairings
    for payload in ("x" * 8193, "é" * 4097, "é" * 8192):
        r = client.post("/v1/pair", content=msgspec.json.encode({"payload": payload}))
        assert_error(r, 400, "payload_too_long")
    assert stats(client).pairings == held


def test_pair_empty_payload_is_400(client: TestClient) -> None:
    r = client.post("/v1/pair", content=b'{"payload":""}')
    assert r.status_code == 400
    assert r.json()["error"] == "empty_payload"
    assert stats(client).pairings == 0


BAD_PAIR_BODIES = {
    "payload_number": (b'{"payload":123}', "invalid_body"),
    "payload_null": (b'{"payload":null}', "invalid_body"),
    "payload_list": (b'{"payload":["a"]}', "invalid_body"),
    "payload_missing": (b'{"ttl_secs":60}', "invalid_body"),
    "ttl_string": (b'{"payload":"p","ttl_secs":"60"}', "invalid_body"),
    "ttl_float": (b'{"payload":"p","ttl_secs":1.5}', "invalid_body"),
    "ttl_bool": (b'{"payload":"p","ttl_secs":true}', "invalid_body"),
    "array": (b'["p"]', "invalid_body"),
    "string": (b'"p"', "invalid_body"),
    "invalid_json": (b'{"payload":', "invalid_json"),
    "empty": (b"", "invalid_json"),
}


@pytest.mark.parametrize(("body", "code"), BAD_PAIR_BODIES.values(), ids=BAD_PAIR_BODIES.keys())
def test_pair_wrong_types_are_400(client: TestClient, body: bytes, code: str) -> None:
    r = client.post("/v1/pair", content=body)
    assert_error(r, 400, code)
    assert stats(client).pairings == 0


def test_pair_resolve_normalizes_the_code(client: TestClient) -> None:
    code = pair(client, {"payload": "norm"})["code"]
    lower = code.lower()
    variants = [
        code,
        lower,
        f"{lower[:3]}-{lower[3:]}",
        f"{code[:3]}-{code[3:]}",
        f"{lower[:3]} {lower[3:]}",
        f" {code[:2]} {code[2:4]} {code[4:]} ",
        f"{code[:3]}--{code[3:]}",
    ]
    for variant in variants:
        r = client.get("/v1/pair/" + variant.replace(" ", "%20"))
        assert r.status_code == 200, variant
        assert r.json() == {"payload": "norm"}


@pytest.mark.parametrize("code", ["ZZZZZZ", "000000", "ABC", "ABCDEFG", "UUUUUU", "%20", "-"])
def test_pair_unknown_code_is_404(client: TestClient, code: str) -> None:
    pair(client, {"payload": "p"})
    assert_error(client.get(f"/v1/pair/{code}"), 404, "not_found")


def test_pair_expired_code_is_404(client: TestClient, store_clock: FakeTime) -> None:
    code = pair(client, {"payload": "p", "ttl_secs": 30})["code"]
    store_clock.offset += 29
    assert client.get(f"/v1/pair/{code}").status_code == 200
    store_clock.offset += 2
    assert_error(client.get(f"/v1/pair/{code}"), 404, "not_found")


def test_pair_resolve_is_rate_limited_per_client(limiter_clock: SimpleNamespace) -> None:
    with make_client(pair_resolve_rate=0.5) as c:
        code = pair(c, {"payload": "p"})["code"]
        assert c.get(f"/v1/pair/{code}").status_code == 200
        for _ in range(9):  # misses cost too, so the code space cannot be walked
            assert c.get("/v1/pair/ZZZZZZ").status_code == 404
        r = c.get(f"/v1/pair/{code}")  # the 11th attempt, even for a good code
        assert_error(r, 429, "pair_rate_limited")
        retry = int(r.headers["retry-after"])
        assert retry >= 1
        # Creating codes is not limited by the resolve limit.
        pair(c, {"payload": "q"})
        limiter_clock.now += retry
        assert c.get(f"/v1/pair/{code}").json() == {"payload": "p"}


SIDE_WRITES = [
    ("keyring", lambda n: b'"blob-%d"' % n),
    ("presence", lambda n: b'{"device_id":"d%d","data":1}' % n),
    ("candidates", lambda n: b'{"device_id":"d%d","data":1}' % n),
]


def test_side_writes_share_one_rate_limit_per_client(limiter_clock: SimpleNamespace) -> None:
    # Issue 18 §3: keyring, presence and candidate writes had no rate limit at all.
    with make_client(side_rate=1, side_burst=6) as c:
        for n in range(6):
            channel, body = SIDE_WRITES[n % 3]
            r = c.post(f"/v1/workspaces/rl/{channel}", content=body(n))
            assert r.status_code == 200, r.text
        before = [c.get(f"/v1/workspaces/rl/{ch}").content for ch, _ in SIDE_WRITES]
        for channel, body in SIDE_WRITES:
            r = c.post(f"/v1/workspaces/rl/{channel}", content=body(99))
            assert_error(r, 429, "side_rate_limited")
            assert int(r.headers["retry-after"]) >= 1
        assert [c.get(f"/v1/workspaces/rl/{ch}").content for ch, _ in SIDE_WRITES] == before
        # Reads and pushes are not side writes.
        assert c.post("/v1/workspaces/rl/envelopes", content=b"1").status_code == 200
        limiter_clock.now += 1
        assert c.post("/v1/workspaces/rl/keyring", content=b'"later"').status_code == 200


@pytest.mark.parametrize("channel", ["presence", "candidates"])
def test_device_body_past_its_own_limit_is_413_before_the_global_body_limit(
    channel: str,
) -> None:
    with make_client(max_side_bytes=64, max_body_bytes=1 << 20) as c:
        big = b'{"device_id":"d","data":"' + b"x" * (64 + DEVICE_BODY_EXTRA) + b'"}'
        r = c.post(f"/v1/workspaces/lim/{channel}", content=big)
        assert_error(r, 413, "payload_too_large")
        assert str(64 + DEVICE_BODY_EXTRA) in r.json()["message"]
        assert c.get(f"/v1/workspaces/lim/{channel}").json() == {}
