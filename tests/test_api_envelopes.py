"""Envelopes over HTTP, through the real ASGI app: POST, GET after a cursor, batch.

Every client error path of PROTOCOL.md's envelope section is checked for its
status, its JSON error code, and that nothing changed in the store.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import msgspec
import pytest
from starlette.testclient import TestClient

import relay.limits
import relay.store.memory
from relay.app import create_app
from relay.settings import Settings
from relay.store.base import ENVELOPE_OVERHEAD, workspace_charge
from tests.support import FakeTime, assert_error, make_client

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hive_envelopes"
HIVE_BODIES = sorted(FIXTURES.glob("*.json"))
WS = "3f2b6c1e-0d7a-4c59-9a64-0f6f1c2d3e4a"
MAX_U64 = (1 << 64) - 1


class RowRaw(msgspec.Struct):
    seq: int
    body: msgspec.Raw


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def env_url(ws: str = WS, suffix: str = "") -> str:
    return f"/v1/workspaces/{ws}/envelopes{suffix}"


def push(c: TestClient, body: bytes, ws: str = WS, **headers: str) -> int:
    r = c.post(env_url(ws), content=body, headers=headers)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert "duplicate" not in answer, answer
    return int(answer["seq"])


def read(c: TestClient, ws: str = WS, **params: Any) -> tuple[list[RowRaw], Any]:
    r = c.get(env_url(ws), params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return msgspec.json.decode(r.content, type=list[RowRaw]), r.headers


def snapshot(c: TestClient, ws: str = WS) -> tuple[bytes, str, str, str, Any]:
    """Everything a client can observe of a workspace, plus the relay-wide counts."""
    r = c.get(env_url(ws))
    assert r.status_code == 200
    h = r.headers
    store: Any = c.app.state.relay.store  # type: ignore[attr-defined]
    return r.content, h["x-relay-head"], h["x-relay-oldest"], h["x-relay-epoch"], store.stats_now()


# ------------------------------------------------------------------ POST + GET
def test_post_returns_seq_and_get_returns_the_row(client: TestClient) -> None:
    r = client.post(env_url(), content=b'{"n":1}')
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    answer = r.json()
    assert set(answer) == {"seq"}
    seq = answer["seq"]
    assert isinstance(seq, int) and 0 < seq < 2**53
    assert client.get(env_url()).content == b'[{"seq":%d,"body":{"n":1}}]' % seq


def test_seqs_strictly_increase_and_reads_are_oldest_first(client: TestClient) -> None:
    seqs = [push(client, b'{"i":%d}' % i) for i in range(50)]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    rows, headers = read(client)
    assert [r.seq for r in rows] == seqs
    assert [bytes(r.body) for r in rows] == [b'{"i":%d}' % i for i in range(50)]
    assert headers["x-relay-head"] == str(seqs[-1])
    assert headers["x-relay-oldest"] == str(seqs[0])
    assert "x-relay-gap" not in headers
    assert "x-relay-more" not in headers


def test_after_returns_only_later_rows(client: TestClient) -> None:
    seqs = [push(client, b"%d" % i) for i in range(5)]
    for k, after in enumerate(seqs):
        rows, _ = read(client, after=after)
        assert [r.seq for r in rows] == seqs[k + 1 :]
    rows, _ = read(client, after=seqs[2] - 1)
    assert [r.seq for r in rows] == seqs[2:]
    rows, headers = read(client, after=MAX_U64)
    assert rows == []
    assert headers["x-relay-head"] == str(seqs[-1])


@pytest.mark.parametrize("path", HIVE_BODIES, ids=lambda p: p.stem)
def test_hive_bodies_round_trip_byte_for_byte(client: TestClient, path: Path) -> None:
    raw = path.read_bytes()
    seq = push(client, raw)
    page = client.get(env_url()).content
    # The page is a join of rows made from the bytes as received: nothing re-encoded.
    assert page == b'[{"seq":%d,"body":%b}]' % (seq, raw)
    (row,) = msgspec.json.decode(page, type=list[RowRaw])
    assert row.seq == seq
    assert bytes(row.body) == raw.strip()


def test_bodies_are_opaque_any_json_value_is_kept_as_sent(client: TestClient) -> None:
    bodies = [
        b'  {"b" : 2 ,"a":1}  ',
        b"[1, 2.50, 1e3]",
        b'"caf\xc3\xa9 \\u00e9"',
        b"null",
        b"-0",
        b'{"a":{"a":{"a":[[[]]]}}}',
    ]
    seqs = [push(client, b) for b in bodies]
    expected = (
        b"["
        + b",".join(b'{"seq":%d,"body":%b}' % sb for sb in zip(seqs, bodies, strict=True))
        + b"]"
    )
    assert client.get(env_url()).content == expected


def test_workspaces_are_independent(client: TestClient) -> None:
    a = push(client, b'{"same":true}', ws="ws-a")
    b = push(client, b'{"same":true}', ws="ws-b")  # same body, other workspace: not a duplicate
    # Idempotency keys are per workspace too.
    a2 = push(client, b"1", ws="ws-a", **{"Idempotency-Key": "shared"})
    b2 = push(client, b"1", ws="ws-b", **{"Idempotency-Key": "shared"})
    rows_a, _ = read(client, ws="ws-a")
    rows_b, _ = read(client, ws="ws-b")
    assert [r.seq for r in rows_a] == [a, a2]
    assert [r.seq for r in rows_b] == [b, b2]


# ----------------------------------------------------------------- idempotency
def test_dedup_by_idempotency_key(client: TestClient) -> None:
    first = push(client, b'{"v":1}', **{"Idempotency-Key": "k-1"})
    before = snapshot(client)
    r = client.post(env_url(), content=b'{"v":"other body"}', headers={"Idempotency-Key": "k-1"})
    assert r.status_code == 200
    assert r.json() == {"seq": first, "duplicate": True}
    assert snapshot(client) == before
    # A new key appends, even with the same body.
    second = push(client, b'{"v":1}', **{"Idempotency-Key": "k-2"})
    assert second > first


def test_dedup_by_hive_event_id(client: TestClient) -> None:
    first = push(client, b'{"v":1}', **{"X-Hive-Event-Id": "evt-1"})
    before = snapshot(client)
    r = client.post(env_url(), content=b'{"v":2}', headers={"X-Hive-Event-Id": "evt-1"})
    assert r.status_code == 200
    assert r.json() == {"seq": first, "duplicate": True}
    assert snapshot(client) == before


def test_idempotency_key_wins_over_hive_event_id(client: TestClient) -> None:
    first = push(client, b"1", **{"Idempotency-Key": "ik", "X-Hive-Event-Id": "ev"})
    r = client.post(
        env_url(), content=b"2", headers={"Idempotency-Key": "ik", "X-Hive-Event-Id": "x"}
    )
    assert r.json() == {"seq": first, "duplicate": True}
    # Same event id, new Idempotency-Key: the key decides, so this is a new envelope.
    third = push(client, b"3", **{"Idempotency-Key": "ik-new", "X-Hive-Event-Id": "ev"})
    assert third > first


def test_dedup_by_sha256_of_the_raw_body(client: TestClient) -> None:
    first = push(client, b'{"a":1}')
    before = snapshot(client)
    r = client.post(env_url(), content=b'{"a":1}')
    assert r.status_code == 200
    assert r.json() == {"seq": first, "duplicate": True}
    assert snapshot(client) == before
    # Another byte sequence of the same JSON value is another body.
    other = push(client, b'{ "a": 1 }')
    assert other > first


def test_dedup_only_for_keys_the_workspace_still_retains() -> None:
    with make_client(max_envelopes=2) as c:
        s1 = push(c, b'"one"')
        s2 = push(c, b'"two"')
        s3 = push(c, b'"three"')  # drops s1
        r = c.post(env_url(), content=b'"two"')
        assert r.json() == {"seq": s2, "duplicate": True}
        again = push(c, b'"one"')  # s1's key is no longer retained: appended anew
        assert again > s3 > s1


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Hive-Event-Id"])
def test_idempotency_key_too_long_is_400(client: TestClient, header: str) -> None:
    push(client, b"0")
    before = snapshot(client)
    r = client.post(env_url(), content=b"1", headers={header: "k" * 201})
    assert_error(r, 400, "invalid_idempotency_key")
    assert snapshot(client) == before
    push(client, b"1", **{header: "k" * 200})


# Keys outside the rule (1–200 of ! … ~), as raw header bytes (issue 18 §9).
BAD_KEYS = {
    "latin-1 e-acute": b"caf\xe9",
    "utf-8 e-acute": "café".encode(),
    "inner space": b"a b",
    "inner tab": b"a\tb",
    "DEL": b"a\x7fb",
    "control": b"a\x01b",
}


@pytest.mark.parametrize("name", list(BAD_KEYS))
@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Hive-Event-Id", "Idempotency-Keys"])
def test_an_idempotency_key_outside_visible_ascii_is_400(
    client: TestClient, header: str, name: str
) -> None:
    push(client, b"0")
    before = snapshot(client)
    path = env_url(suffix="/batch") if header == "Idempotency-Keys" else env_url()
    body = b"[1]" if header == "Idempotency-Keys" else b"1"
    r = client.post(path, content=body, headers=[(header.encode(), BAD_KEYS[name])])
    assert_error(r, 400, "invalid_idempotency_key")
    assert "visible ASCII" in r.json()["message"]
    assert snapshot(client) == before


def test_every_visible_ascii_character_is_a_key_character(client: TestClient) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F))
    first = push(client, b"1", **{"Idempotency-Key": key})
    r = client.post(env_url(), content=b"2", headers={"Idempotency-Key": key})
    assert r.json() == {"seq": first, "duplicate": True}


def test_the_same_key_over_http_and_websocket_is_one_envelope(client: TestClient) -> None:
    seq = push(client, b"1", **{"Idempotency-Key": "k-both"})
    with client.websocket_connect(f"/v1/workspaces/{WS}/ws") as sock:
        sock.send_text(msgspec.json.encode({"op": "pub", "body": 2, "key": "k-both"}).decode())
        assert msgspec.json.decode(sock.receive_text()) == {
            "op": "ack",
            "seq": seq,
            "ref": None,
            "duplicate": True,
        }
        for key in ("café", "a b", "\u00e9", "k" * 201, ""):
            sock.send_text(msgspec.json.encode({"op": "pub", "body": 3, "key": key}).decode())
            err = msgspec.json.decode(sock.receive_text())
            assert err["op"] == "error" and err["error"] == "invalid_idempotency_key", err
    assert [row["seq"] for row in client.get(env_url()).json()] == [seq]


# ---------------------------------------------------------------- invalid JSON
DEEP = 200_000
INVALID_JSON = {
    "truncated": b'{"a":1',
    "truncated_string": b'"abc',
    "two_values": b"1 2",
    "two_objects": b"{}{}",
    "nan": b"NaN",
    "nan_inside": b'{"a":NaN}',
    "infinity": b"[Infinity]",
    "invalid_utf8": b'"\xff\xfe"',
    "overlong_utf8": b'"\xc0\xaf"',
    "utf8_surrogate": b'"\xed\xa0\x80"',
    "empty": b"",
    "whitespace_only": b" \n\t ",
    "trailing_comma": b"[1,2,]",
    "single_quotes": b"{'a':1}",
    "bare_word": b"hello",
    "control_char_in_string": b'"a\x01b"',
    "deep_arrays": b"[" * DEEP + b"]" * DEEP,
    "deep_objects": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
}


@pytest.mark.parametrize("body", INVALID_JSON.values(), ids=INVALID_JSON.keys())
def test_invalid_json_is_400_and_nothing_is_appended(client: TestClient, body: bytes) -> None:
    push(client, b'{"before":true}')
    before = snapshot(client)
    r = client.post(env_url(), content=body)
    assert_error(r, 400, "invalid_json")
    assert snapshot(client) == before


def test_deep_but_reasonable_nesting_is_accepted(client: TestClient) -> None:
    body = b"[" * 500 + b"]" * 500
    seq = push(client, body)
    assert client.get(env_url()).content == b'[{"seq":%d,"body":%b}]' % (seq, body)


# ------------------------------------------------------------------ body size
def test_body_at_the_limit_is_accepted_and_one_byte_more_is_413() -> None:
    with make_client(max_body_bytes=1024) as c:
        at_limit = b'"' + b"a" * 1022 + b'"'
        assert len(at_limit) == 1024
        push(c, at_limit)
        before = snapshot(c)
        over = b'"' + b"a" * 1023 + b'"'
        r = c.post(env_url(), content=over)
        assert_error(r, 413, "payload_too_large")
        assert snapshot(c) == before


def test_chunked_body_over_the_limit_is_413() -> None:
    def chunks(n: int) -> Iterator[bytes]:
        yield b'"'
        for _ in range(n):
            yield b"a" * 100
        yield b'"'

    with make_client(max_body_bytes=1024) as c:
        r = c.post(env_url(), content=chunks(5))
        assert r.status_code == 200, r.text
        assert "content-length" not in r.request.headers
        before = snapshot(c)
        r = c.post(env_url(), content=chunks(50))
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "payload_too_large")
        assert snapshot(c) == before


async def _call_asgi(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], chunks: Iterator[bytes]
) -> tuple[int, bytes, int]:
    """POST through the raw ASGI interface; returns (status, body, chunks the app read)."""
    consumed = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal consumed
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, consumed


def test_streamed_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    app = create_app(Settings(push_rate=0, max_body_bytes=4096))

    def endless() -> Iterator[bytes]:
        yield b'"'
        for _ in range(100_000):  # 100 MB if the relay kept reading
            yield b"a" * 1024

    status, body, consumed = anyio.run(_call_asgi, app, env_url(), [], endless())
    assert status == 413
    assert msgspec.json.decode(body)["error"] == "payload_too_large"
    assert consumed <= 4096 // 1024 + 2
    assert app.state.relay.store.stats_now().envelopes == 0


def test_declared_content_length_over_the_limit_is_refused_before_reading() -> None:
    app = create_app(Settings(push_rate=0, max_body_bytes=4096))

    def must_not_be_read() -> Iterator[bytes]:
        raise AssertionError("the relay read a body whose Content-Length is over the limit")
        yield b""  # pragma: no cover

    headers = [(b"content-length", b"999999999")]
    status, body, consumed = anyio.run(_call_asgi, app, env_url(), headers, must_not_be_read())
    assert status == 413
    assert msgspec.json.decode(body)["error"] == "payload_too_large"
    assert consumed == 0


def test_batch_body_over_the_limit_is_413() -> None:
    with make_client(max_body_bytes=1024) as c:
        before = snapshot(c)
        body = b"[" + b",".join([b'"' + b"a" * 98 + b'"'] * 20) + b"]"
        r = c.post(env_url(suffix="/batch"), content=body)
        assert_error(r, 413, "payload_too_large")
        assert snapshot(c) == before


# ---------------------------------------------------------- GET validation
@pytest.mark.parametrize(
    "value", ["-1", "abc", "1.5", "1e3", "", " 1", "+1", "0x10", "\uff11", str(1 << 64), "9" * 30]
)
def test_after_must_be_a_non_negative_integer_below_2_64(client: TestClient, value: str) -> None:
    push(client, b"1")
    r = client.get(env_url(), params={"after": value})
    assert_error(r, 400, "invalid_after")


def test_after_bounds_are_accepted(client: TestClient) -> None:
    seq = push(client, b"1")
    assert [r.seq for r in read(client, after=0)[0]] == [seq]
    assert read(client, after=MAX_U64)[0] == []


@pytest.mark.parametrize("value", ["0", "10001", "-1", "x", "", "1.0", str(1 << 64)])
def test_limit_must_be_1_to_10000(client: TestClient, value: str) -> None:
    push(client, b"1")
    r = client.get(env_url(), params={"limit": value})
    assert_error(r, 400, "invalid_limit")


def test_limit_bounds_and_more_header(client: TestClient) -> None:
    seqs = [push(client, b"%d" % i) for i in range(5)]
    rows, headers = read(client, limit=1)
    assert [r.seq for r in rows] == seqs[:1]
    assert headers["x-relay-more"] == "true"
    rows, headers = read(client, limit=2, after=seqs[2])
    assert [r.seq for r in rows] == seqs[3:]
    assert "x-relay-more" not in headers  # exactly the rest: nothing remains
    rows, headers = read(client, limit=10000)
    assert [r.seq for r in rows] == seqs
    assert "x-relay-more" not in headers


@pytest.mark.parametrize("value", ["61", "-1", "x", "1.5"])
def test_wait_must_be_0_to_60(client: TestClient, value: str) -> None:
    r = client.get(env_url(), params={"wait": value})
    assert_error(r, 400, "invalid_wait")


def test_unknown_workspace_reads_as_empty_with_zero_headers(client: TestClient) -> None:
    r = client.get(env_url("never-used"))
    assert r.status_code == 200
    assert r.content == b"[]"
    assert r.headers["x-relay-head"] == "0"
    assert r.headers["x-relay-oldest"] == "0"
    assert r.headers["x-relay-epoch"]
    assert "x-relay-gap" not in r.headers
    assert "x-relay-more" not in r.headers
    # Reading does not create the workspace.
    assert client.app.state.relay.store.stats_now().workspaces == 0  # type: ignore[attr-defined]


def test_epoch_is_stable_and_relay_wide(client: TestClient) -> None:
    epoch = client.get(env_url("a")).headers["x-relay-epoch"]
    push(client, b"1", ws="a")
    assert client.get(env_url("a")).headers["x-relay-epoch"] == epoch
    assert client.get(env_url("b")).headers["x-relay-epoch"] == epoch


# ------------------------------------------------------------ page byte cap
def test_page_byte_cap_returns_at_least_one_row_and_signals_more() -> None:
    with make_client(max_page_bytes=1) as c:
        bodies = [b'{"pad":"%b"}' % (b"x" * 300), b"1", b"2", b"3", b"4"]
        seqs = [push(c, b) for b in bodies]
        after, seen = 0, []
        while True:
            rows, headers = read(c, after=after)
            assert len(rows) == 1  # the cap is below one row, yet every page has one
            seen += rows
            after = rows[-1].seq
            if after == seqs[-1]:
                assert "x-relay-more" not in headers
                break
            assert headers["x-relay-more"] == "true"
        assert [r.seq for r in seen] == seqs
        assert [bytes(r.body) for r in seen] == bodies


def test_page_byte_cap_stops_after_the_row_that_reaches_it() -> None:
    with make_client(max_page_bytes=1000) as c:
        seqs = [push(c, b'"%b%d"' % (b"y" * 200, i)) for i in range(10)]
        rows, headers = read(c)
        assert 1 <= len(rows) < 10
        assert sum(len(b'{"seq":%d,"body":%b}' % (r.seq, bytes(r.body))) for r in rows) <= 1000
        assert headers["x-relay-more"] == "true"
        assert [r.seq for r in rows] == seqs[: len(rows)]


# --------------------------------------------------------------- retention
def test_retention_by_count_moves_oldest_and_reports_the_gap() -> None:
    with make_client(max_envelopes=3) as c:
        s = [push(c, b"%d" % i) for i in range(3)]
        rows, headers = read(c)
        assert [r.seq for r in rows] == s
        assert headers["x-relay-oldest"] == str(s[0])
        assert "x-relay-gap" not in headers

        s += [push(c, b"%d" % i) for i in range(3, 5)]  # drops s[0] and s[1]
        rows, headers = read(c)
        assert [r.seq for r in rows] == s[2:]
        assert headers["x-relay-oldest"] == str(s[2])
        assert headers["x-relay-head"] == str(s[4])
        assert headers["x-relay-gap"] == "true"  # after=0 is below the dropped horizon

        _, headers = read(c, after=s[0])
        assert headers["x-relay-gap"] == "true"  # s[1] was dropped unread
        rows, headers = read(c, after=s[1])
        assert [r.seq for r in rows] == s[2:]
        assert "x-relay-gap" not in headers  # the caller has read everything dropped
        _, headers = read(c, after=s[3])
        assert "x-relay-gap" not in headers

        s.append(push(c, b"5"))
        _, headers = read(c, after=s[4])
        assert headers["x-relay-oldest"] == str(s[3])


def test_global_byte_budget_drops_the_oldest_relay_wide_first() -> None:
    def body(i: int) -> bytes:  # distinct bodies of equal size
        return b'"%03d%b"' % (i, b"z" * 297)

    with make_client() as probe:
        row_len = len(probe.get(env_url()).content.replace(b"[]", b"")) + len(
            b'{"seq":%d,"body":%b}' % (push(probe, body(0)), body(0))
        )
    # Room for two workspaces and four envelopes, not five, as charged (relay.store.base):
    # a row, its 32-byte body digest (the dedup key) and the per-envelope overhead.
    cost = row_len + 32 + ENVELOPE_OVERHEAD
    room = 2 * workspace_charge("a") + 4 * cost + cost // 2
    with make_client(max_bytes=room) as c:
        a1 = push(c, body(1), ws="a")
        b1 = push(c, body(2), ws="b")
        a2 = push(c, body(3), ws="a")
        b2 = push(c, body(4), ws="b")
        for ws, seqs in (("a", [a1, a2]), ("b", [b1, b2])):
            rows, headers = read(c, ws=ws)
            assert [r.seq for r in rows] == seqs
            assert "x-relay-gap" not in headers

        b3 = push(c, body(5), ws="b")  # over budget: the relay-wide oldest (a1) goes
        rows, headers = read(c, ws="a")
        assert [r.seq for r in rows] == [a2]
        assert headers["x-relay-oldest"] == str(a2)
        assert headers["x-relay-gap"] == "true"
        rows, headers = read(c, ws="b")
        assert [r.seq for r in rows] == [b1, b2, b3]
        assert "x-relay-gap" not in headers

        b4 = push(c, body(6), ws="b")  # the next oldest relay-wide: b1
        rows, headers = read(c, ws="b")
        assert [r.seq for r in rows] == [b2, b3, b4]
        assert headers["x-relay-gap"] == "true"
        assert [r.seq for r in read(c, ws="a")[0]] == [a2]

        push(c, body(7), ws="b")  # then a2: workspace a is empty but keeps its head
        rows, headers = read(c, ws="a")
        assert rows == []
        assert headers["x-relay-head"] == str(a2)
        assert headers["x-relay-oldest"] == "0"
        assert headers["x-relay-gap"] == "true"
        assert "x-relay-gap" not in read(c, ws="a", after=a2)[1]
        # A new push to the emptied workspace continues above its old head.
        assert push(c, body(8), ws="a") > a2


def test_retention_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeTime()
    monkeypatch.setattr(relay.store.memory, "time", clock)
    with make_client(retention_days=1) as c:
        old = push(c, b'"old"')
        clock.offset += 0.5 * 86400
        mid = push(c, b'"mid"')
        clock.offset += 0.75 * 86400  # old is 1.25 days old, mid 0.75
        new = push(c, b'"new"')
        rows, headers = read(c)
        assert [r.seq for r in rows] == [mid, new]
        assert headers["x-relay-gap"] == "true"
        assert headers["x-relay-oldest"] == str(mid)
        # The periodic sweep prunes by age without an append.
        clock.offset += 0.5 * 86400
        c.app.state.relay.store.sweep()  # type: ignore[attr-defined]
        rows, headers = read(c, after=old)
        assert [r.seq for r in rows] == [new]
        assert headers["x-relay-gap"] == "true"


def test_restart_without_snapshot_never_rewinds_seqs_and_changes_the_epoch() -> None:
    with make_client() as first:
        seqs = [push(first, b"%d" % i) for i in range(3)]
        epoch = first.get(env_url()).headers["x-relay-epoch"]
    with make_client() as second:  # a new process: nothing kept
        rows, headers = read(second, after=seqs[-1])
        assert rows == []
        assert headers["x-relay-epoch"] != epoch
        again = push(second, b"0")  # the same body: the old key is gone with the old relay
        assert again > seqs[-1]
        rows, _ = read(second, after=seqs[-1])
        assert [r.seq for r in rows] == [again]


# -------------------------------------------------------------------- batch
def batch(c: TestClient, body: bytes, ws: str = WS, **headers: str) -> Any:
    r = c.post(env_url(ws, "/batch"), content=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_batch_appends_in_element_order(client: TestClient) -> None:
    first = push(client, b'"single"')
    answer = batch(client, b'[ {"a" : 1} , [1, 2] ,"three",null]')
    seqs = answer["seqs"]
    assert len(seqs) == 4
    assert all(a < b for a, b in zip([first, *seqs], seqs, strict=False))
    rows, _ = read(client, after=first)
    assert [r.seq for r in rows] == seqs
    # Each element is stored exactly as its bytes appeared in the array.
    assert [bytes(r.body) for r in rows] == [b'{"a" : 1}', b"[1, 2]", b'"three"', b"null"]


def test_batch_of_hive_bodies_round_trips_byte_for_byte(client: TestClient) -> None:
    raws = [p.read_bytes().strip() for p in HIVE_BODIES]
    seqs = batch(client, b"[" + b",".join(raws) + b"]")["seqs"]
    expected = (
        b"[" + b",".join(b'{"seq":%d,"body":%b}' % sb for sb in zip(seqs, raws, strict=True)) + b"]"
    )
    assert client.get(env_url()).content == expected


def test_batch_dedups_within_the_batch_and_against_earlier_pushes(client: TestClient) -> None:
    earlier = push(client, b'"old"')
    answer = batch(client, b'["new", "old", "new", "other"]')
    seqs = answer["seqs"]
    assert seqs[1] == earlier
    assert seqs[0] == seqs[2]
    assert seqs[3] > seqs[0] > earlier
    rows, _ = read(client)
    assert [r.seq for r in rows] == [earlier, seqs[0], seqs[3]]
    if "duplicates" in answer:  # extension
        assert answer["duplicates"] == [False, True, True, False]


def test_batch_idempotency_keys_header(client: TestClient) -> None:
    seqs = batch(client, b"[1, 2, 3]", **{"Idempotency-Keys": "k1, k2, k3"})["seqs"]
    before = snapshot(client)
    # Other bodies, same keys: every element is a duplicate of its original.
    again = batch(client, b"[7, 8, 9]", **{"Idempotency-Keys": "k1,k2,k3"})["seqs"]
    assert again == seqs
    assert snapshot(client) == before
    # The single-push Idempotency-Key shares the key space.
    r = client.post(env_url(), content=b"10", headers={"Idempotency-Key": "k2"})
    assert r.json() == {"seq": seqs[1], "duplicate": True}


@pytest.mark.parametrize("keys", ["k1,k2", "k1,k2,k3,k4", "k1"])
def test_batch_idempotency_keys_count_mismatch_is_400(client: TestClient, keys: str) -> None:
    push(client, b'"before"')
    before = snapshot(client)
    r = client.post(
        env_url(suffix="/batch"), content=b"[1,2,3]", headers={"Idempotency-Keys": keys}
    )
    assert_error(r, 400, "invalid_idempotency_key")
    assert snapshot(client) == before


def test_batch_idempotency_key_entry_too_long_is_400(client: TestClient) -> None:
    push(client, b'"before"')
    before = snapshot(client)
    r = client.post(
        env_url(suffix="/batch"), content=b"[1,2]", headers={"Idempotency-Keys": "ok," + "k" * 201}
    )
    assert_error(r, 400, "invalid_idempotency_key")
    assert snapshot(client) == before


BAD_BATCH_JSON = {
    "bad_element_middle": b'[1, {"a":}, 3]',
    "nan_element": b"[1, NaN]",
    "truncated": b"[1, 2",
    "invalid_utf8_element": b'[1, "\xff"]',
    "trailing_value": b"[1] [2]",
    "empty": b"",
}


@pytest.mark.parametrize("body", BAD_BATCH_JSON.values(), ids=BAD_BATCH_JSON.keys())
def test_batch_with_invalid_json_anywhere_appends_nothing(client: TestClient, body: bytes) -> None:
    push(client, b'"before"')
    before = snapshot(client)
    r = client.post(env_url(suffix="/batch"), content=body)
    assert_error(r, 400, "invalid_json")
    assert snapshot(client) == before


@pytest.mark.parametrize("body", [b'{"a":1}', b"1", b'"[1]"', b"null", b"true"])
def test_batch_that_is_not_an_array_is_400(client: TestClient, body: bytes) -> None:
    push(client, b'"before"')
    before = snapshot(client)
    r = client.post(env_url(suffix="/batch"), content=body)
    assert_error(r, 400, "invalid_batch")
    assert snapshot(client) == before


@pytest.mark.parametrize("count", [0, 1001])
def test_batch_must_hold_1_to_1000_elements(client: TestClient, count: int) -> None:
    push(client, b'"before"')
    before = snapshot(client)
    body = b"[" + b",".join(b"%d" % i for i in range(count)) + b"]"
    r = client.post(env_url(suffix="/batch"), content=body)
    assert_error(r, 400, "invalid_batch")
    assert snapshot(client) == before


def test_batch_of_1000_is_accepted(client: TestClient) -> None:
    seqs = batch(client, b"[" + b",".join(b"%d" % i for i in range(1000)) + b"]")["seqs"]
    assert len(seqs) == 1000
    assert all(a < b for a, b in itertools.pairwise(seqs))
    rows, _ = read(client, limit=10000)
    assert [r.seq for r in rows] == seqs


# -------------------------------------------------------- workspace ids
BAD_WORKSPACES = {
    "too_long": "a" * 201,
    "space": "a b",
    "nul": "a%00b",
    "dot": "%2E",
    "dotdot": "%2E%2E",
    "comma": "a,b",
    "non_ascii": "caf%C3%A9",
    "percent": "a%25b",
    "plus": "a+b",
}
WS_ROUTES = [
    ("POST", "/envelopes", b"1"),
    ("GET", "/envelopes", None),
    ("POST", "/envelopes/batch", b"[1]"),
    ("POST", "/keyring", b"1"),
    ("GET", "/keyring", None),
    ("POST", "/presence", b'{"device_id":"d"}'),
    ("GET", "/presence", None),
    ("POST", "/candidates", b'{"device_id":"d"}'),
    ("GET", "/candidates", None),
    ("GET", "/events", None),
]


@pytest.mark.parametrize("ws", BAD_WORKSPACES.values(), ids=BAD_WORKSPACES.keys())
@pytest.mark.parametrize(
    ("method", "suffix", "body"), WS_ROUTES, ids=[f"{m} {s}" for m, s, _ in WS_ROUTES]
)
def test_invalid_workspace_id_is_400(
    client: TestClient, ws: str, method: str, suffix: str, body: bytes | None
) -> None:
    r = client.request(method, f"/v1/workspaces/{ws}{suffix}", content=body)
    assert_error(r, 400, "invalid_workspace")
    stats = client.app.state.relay.store.stats_now()  # type: ignore[attr-defined]
    assert (stats.workspaces, stats.envelopes) == (0, 0)


@pytest.mark.parametrize("ws", [".", ".."])
def test_literal_dot_workspaces_are_400(ws: str) -> None:
    # httpx removes dot segments, so send the path as a client like `curl --path-as-is` would.
    app = create_app(Settings(push_rate=0))
    status, body, _ = anyio.run(_call_asgi, app, env_url(ws), [], iter([b"1"]))
    assert status == 400
    assert msgspec.json.decode(body)["error"] == "invalid_workspace"
    assert app.state.relay.store.stats_now().workspaces == 0


def test_workspace_id_alphabet_and_length_are_accepted(client: TestClient) -> None:
    for ws in ("a" * 200, "A-Za-z0-9._~:@-", "x", "...", "a.b"):
        seq = push(client, b"1", ws=ws)
        assert [r.seq for r in read(client, ws=ws)[0]] == [seq]


# ------------------------------------------------- unknown routes and methods
@pytest.mark.parametrize(
    "path",
    ["/nope", "/v1", "/v1/workspaces/w/nope", "/v1/workspaces/w/envelopes/extra", "/v2/health"],
)
def test_unknown_route_is_404_json(client: TestClient, path: str) -> None:
    assert_error(client.get(path), 404, "not_found")
    assert_error(client.post(path, content=b"1"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/workspaces/w/envelopes"),
        ("PUT", "/v1/workspaces/w/envelopes"),
        ("GET", "/v1/workspaces/w/envelopes/batch"),
        ("POST", "/v1/health"),
        ("PUT", "/v1/pair"),
        ("DELETE", "/v1/pair/ABC123"),
        ("PATCH", "/v1/workspaces/w/keyring"),
    ],
)
def test_wrong_method_is_405_json(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path, content=b"1")
    assert_error(r, 405, "method_not_allowed")
    assert client.app.state.relay.store.stats_now().workspaces == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/workspaces/w/envelopes", {"GET", "POST"}),
        ("/v1/workspaces/w/keyring", {"GET", "POST"}),
        ("/v1/workspaces/w/presence", {"GET", "POST"}),
        ("/v1/workspaces/w/candidates", {"GET", "POST"}),
        ("/v1/health", {"GET", "HEAD"}),
    ],
)
def test_405_allow_header_lists_every_method_of_the_path(
    client: TestClient, path: str, methods: set[str]
) -> None:
    # RFC 9110 §15.5.6: a 405 carries Allow with the resource's supported methods.
    r = client.request("DELETE", path)
    assert r.status_code == 405
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert methods <= allowed, allowed


# -------------------------------------------------------------- push rate
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(relay.limits, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_push_rate_limit_is_429_with_retry_after_and_appends_nothing(clock: FakeClock) -> None:
    with make_client(push_rate=1, push_burst=2) as c:
        push(c, b"1")
        push(c, b"2")
        before = snapshot(c)
        r = c.post(env_url(), content=b"3")
        assert_error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
        assert snapshot(c) == before
        # Batches are pushes too.
        r = c.post(env_url(suffix="/batch"), content=b"[3]")
        assert_error(r, 429, "rate_limited")
        assert snapshot(c) == before
        # Reads are not rate-limited.
        assert c.get(env_url()).status_code == 200
        clock.now += float(r.headers["retry-after"])
        push(c, b"3")


def test_push_rate_limit_is_per_client(clock: FakeClock) -> None:
    app = create_app(Settings(push_rate=1, push_burst=1))
    first = TestClient(app, client=("192.0.2.1", 40000))
    second = TestClient(app, client=("192.0.2.2", 40000))
    push(first, b"1")
    assert_error(first.post(env_url(), content=b"2"), 429, "rate_limited")
    push(second, b"2")


def test_forwarded_for_counts_only_from_a_trusted_proxy(clock: FakeClock) -> None:
    untrusted = TestClient(
        create_app(Settings(push_rate=1, push_burst=1)), client=("192.0.2.1", 40000)
    )
    push(untrusted, b"1", **{"X-Forwarded-For": "198.51.100.1"})
    # A client cannot buy a fresh bucket by naming another address.
    r = untrusted.post(env_url(), content=b"2", headers={"X-Forwarded-For": "198.51.100.2"})
    assert_error(r, 429, "rate_limited")

    proxied = TestClient(
        create_app(Settings(push_rate=1, push_burst=1, trusted_proxies="10.0.0.0/8")),
        client=("10.1.2.3", 40000),
    )
    push(proxied, b"1", **{"X-Forwarded-For": "198.51.100.1"})
    push(proxied, b"2", **{"X-Forwarded-For": "198.51.100.2"})
    r = proxied.post(env_url(), content=b"3", headers={"X-Forwarded-For": "198.51.100.1"})
    assert_error(r, 429, "rate_limited")
    # A spoofed entry left of the real client is ignored: the last untrusted hop counts.
    r = proxied.post(
        env_url(), content=b"4", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.2"}
    )
    assert_error(r, 429, "rate_limited")


def test_push_rate_zero_is_off() -> None:
    with make_client(push_rate=0, push_burst=1) as c:
        for i in range(20):
            push(c, b"%d" % i)
