"""Hostile input against a real relay process (`python -m relay`, uvicorn, httptools).

Every case sends what a careless or malicious client might, byte for byte where
a client library would tidy it up (raw sockets), and asserts three things:

* a clean answer: a 4xx (or 503 with Retry-After where the relay protects
  itself), never a 2xx for bad input, never a 5xx, never a stack trace;
* no change of state: the store's gauges, the appended counter and the
  contents of the targeted workspaces are what they were before;
* a healthy relay afterwards: the process runs and `/v1/health` answers 200.

Waits are bounded and never timing assertions: a condition is polled until it
holds or a generous deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from relay.api.side import PAIR_BODY_MAX
from tests.rawhttp import (
    Answer,
    assert_clean_4xx,
    connect,
    exchange,
    read_answer,
    recv_into,
    request,
    upgrade,
)
from tests.relayproc import RelayProcess
from tests.support import as_client

WAIT = 20.0  # upper bound on any wait for a condition
MAX_BODY = 1 << 20  # the hostile relay's body limit (room for 200,000-deep nesting)
HEADER_LIMIT = 8192
TARGET = "target"  # the workspace the hostile requests aim at
CANARY = "canary"  # a workspace with known contents that must never change
TOKEN = "hostile-token-3b9f"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------- state and health
STORE_GAUGES = (
    "hive_relay_workspaces",
    "hive_relay_envelopes_retained",
    "hive_relay_stored_bytes",
    "hive_relay_pairings",
    "hive_relay_envelopes_appended_total",
)


def gauges(relay: RelayProcess, headers: dict[str, str] | None = None) -> dict[str, float]:
    text = httpx.get(relay.url + "/metrics", headers=headers, timeout=WAIT).text
    out = {}
    for name in STORE_GAUGES:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m, name
        out[name] = float(m.group(1))
    return out


def contents(relay: RelayProcess, ws: str, headers: dict[str, str] | None = None) -> tuple:
    with httpx.Client(base_url=relay.url, headers=headers, timeout=WAIT) as c:
        return tuple(
            c.get(f"/v1/workspaces/{ws}/{what}").content
            for what in ("envelopes", "keyring", "presence", "candidates")
        )


def state(relay: RelayProcess, auth: dict[str, str] | None = None) -> tuple:
    return (gauges(relay), contents(relay, TARGET, auth), contents(relay, CANARY, auth))


def assert_healthy(relay: RelayProcess) -> None:
    assert relay.proc is not None and relay.proc.poll() is None, relay.logs()[-3000:]
    r = httpx.get(relay.url + "/v1/health", timeout=WAIT)
    assert (r.status_code, r.text) == (200, "ok")


@contextlib.contextmanager
def unchanged(relay: RelayProcess, auth: dict[str, str] | None = None) -> Iterator[None]:
    """The block must leave the relay's state as it found it, and the relay healthy."""
    before = state(relay, auth)
    yield
    assert_healthy(relay)
    assert state(relay, auth) == before


def assert_parser_400(answers: list[Answer]) -> None:
    """A request uvicorn's HTTP parser refuses: 400, then the connection closes."""
    assert answers, "the relay closed the connection without an answer"
    assert answers[0].status == 400, answers[0]
    assert b"Traceback" not in answers[0].body


def seed(relay: RelayProcess, auth: dict[str, str] | None = None) -> None:
    with httpx.Client(base_url=relay.url, headers=auth, timeout=WAIT) as c:
        for ws in (CANARY, TARGET):
            assert c.post(f"/v1/workspaces/{ws}/envelopes", json={"seed": ws}).status_code == 200
            assert c.post(f"/v1/workspaces/{ws}/keyring", json={"k": 1}).status_code == 200
            body = {"device_id": "d1", "data": {"on": True}}
            assert c.post(f"/v1/workspaces/{ws}/presence", json=body).status_code == 200
            assert c.post(f"/v1/workspaces/{ws}/candidates", json=body).status_code == 200


@pytest.fixture(scope="module")
def relay() -> Iterator[RelayProcess]:
    """An open relay with small limits and the rate limits off."""
    env = {
        "HIVE_RELAY_MAX_BODY_BYTES": str(MAX_BODY),
        "HIVE_RELAY_HEADER_LIMIT": str(HEADER_LIMIT),
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_PAIR_RESOLVE_RATE": "0",
        "HIVE_RELAY_SIDE_RATE": "0",
        "HIVE_RELAY_PAIR_CREATE_RATE": "0",
        "HIVE_RELAY_MAX_SIDE_BYTES": "4096",
    }
    with RelayProcess(env=env) as proc:
        seed(proc)
        yield proc
        assert_healthy(proc)
    assert "Traceback" not in proc.logs()


# --------------------------------------------------------- malformed JSON
DEEP = 200_000
MALFORMED_JSON: dict[str, bytes] = {
    "empty": b"",
    "whitespace only": b"  \n ",
    "truncated object": b'{"a":',
    "truncated array": b"[1,2",
    "truncated string": b'"abc',
    "truncated literal": b"tru",
    "truncated number": b"1e",
    "missing colon": b'{"a" 1}',
    "concatenated objects": b"{}{}",
    "concatenated numbers": b"1 2",
    "concatenated arrays": b"[] []",
    "trailing garbage": b'{"a":1} x',
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "NaN inside": b'{"a":[1,NaN]}',
    "invalid UTF-8 byte": b'"\xff"',
    "overlong UTF-8": b'"\xc0\xaf"',
    "UTF-8-encoded surrogate": b'"\xed\xa0\x80"',
    "truncated UTF-8 sequence": b'"\xe2\x82"',
    "invalid UTF-8 in a key": b'{"\xfe":1}',
    "lone high surrogate": b'"\\ud800"',
    "lone low surrogate": b'"\\udc00"',
    "high surrogate then letter": b'"\\ud800\\u0041"',
    "lone surrogate in a key": b'{"\\udbff":1}',
    "200,000-deep arrays": b"[" * DEEP + b"]" * DEEP,
    "200,000-deep objects": b'{"":' * DEEP + b"1" + b"}" * DEEP,
    "200,000-deep, unclosed": b"[" * DEEP,
    "single quotes": b"{'a':1}",
    "trailing comma": b"[1,]",
    "trailing comma in object": b'{"a":1,}',
    "comment": b"/* c */ {}",
    "control character in string": b'"a\x01b"',
    "raw newline in string": b'"a\nb"',
    "leading zero": b"01",
    "plus sign": b"+1",
    "bare fraction": b".5",
    "hex number": b"0x10",
    "undefined": b"undefined",
    "NUL": b"\x00",
    "UTF-16": '{"a":1}'.encode("utf-16"),
    "invalid escape": b'"\\x41"',
    "short unicode escape": b'"\\u12"',
}

JSON_ROUTES = {
    "envelope": f"/v1/workspaces/{TARGET}/envelopes",
    "keyring": f"/v1/workspaces/{TARGET}/keyring",
    "presence": f"/v1/workspaces/{TARGET}/presence",
    "candidates": f"/v1/workspaces/{TARGET}/candidates",
    "pair": "/v1/pair",
}


# Side-channel routes stop reading at their own limit (the relay fixture's
# HIVE_RELAY_MAX_SIDE_BYTES, plus the device entry's frame): a longer body is 413.
SIDE_BODY_LIMITS = {"keyring": 4096, "presence": 4096 + 2048, "candidates": 4096 + 2048}


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_malformed_json_of_every_kind_is_400(relay: RelayProcess, route: str) -> None:
    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for name, body in MALFORMED_JSON.items():
            r = c.post(JSON_ROUTES[route], content=body)
            limit = PAIR_BODY_MAX if route == "pair" else SIDE_BODY_LIMITS.get(route, MAX_BODY)
            if len(body) > limit:
                # Each side route reads only up to its own limit: refused before parsing.
                assert_clean_4xx(r, 413)
                assert r.json()["error"] == "payload_too_large", (name, r.json())
                continue
            assert r.status_code == 400, (name, r.status_code, r.text[:200])
            assert_clean_4xx(r)
            assert r.json()["error"] in ("invalid_json", "invalid_body"), (name, r.json())


def test_malformed_json_inside_a_batch_appends_nothing(relay: RelayProcess) -> None:
    url = f"/v1/workspaces/{TARGET}/envelopes/batch"
    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for name, body in MALFORMED_JSON.items():
            if not body.strip():
                continue  # `[{}, ]` is a different mistake, covered below
            r = c.post(url, content=b'[{"ok":1},' + body + b"]")
            assert r.status_code == 400, (name, r.status_code, r.text[:200])
            assert_clean_4xx(r)
        for body in (b"[]", b"{}", b'"x"', b"[{},]", b"[" + b"{}," * 1000 + b"{}]"):
            assert_clean_4xx(c.post(url, content=body), 400)


def test_malformed_websocket_frames_answer_error_frames(relay: RelayProcess) -> None:
    frames: list[str | bytes] = [
        "not json",
        "{}",
        '{"op":5}',
        '{"op":"pub"}',
        '{"op":"pub","body":NaN}',
        '{"op":"pub","body":"\\ud800"}',
        '{"op":"pub","body":1}{"op":"pub","body":2}',
        '{"op":"pub","body":' + "[" * DEEP + "]" * DEEP + "}",
        '{"op":"pub","body":1,"key":""}',
        '{"op":"pub","body":1,"key":"' + "k" * 201 + '"}',
        '{"op":"sub","after":-1}',
        '{"op":"sub","after":18446744073709551616}',
        '{"op":"sub","after":"0"}',
        '{"op":"nope"}',
        b"\xff\xfe binary, not UTF-8",
        b'{"op":"pub","body":"\xff"}',
    ]

    async def scenario() -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/{TARGET}/ws"
        async with websockets.connect(url, max_size=None) as sock:
            errors = []
            for frame in frames:
                await sock.send(frame)
                errors.append(json.loads(await asyncio.wait_for(sock.recv(), WAIT)))
            # Still open and working: a good subscription replays the workspace.
            await sock.send(json.dumps({"op": "sub", "after": 0}))
            env = json.loads(await asyncio.wait_for(sock.recv(), WAIT))
            assert env["op"] == "env" and env["body"] == {"seed": TARGET}
            return errors

    with unchanged(relay):
        errors = asyncio.run(scenario())
    for frame, error in zip(frames, errors, strict=True):
        assert error["op"] == "error", (frame, error)
        assert re.fullmatch(r"[a-z_]+", error["error"]), error
        assert "Traceback" not in error["message"]


def test_clients_vanishing_mid_stream_are_not_errors() -> None:
    """WebSocket and SSE subscribers that go away — with or without a close
    hand-shake — while the relay is sending to them, during a replay or live
    delivery: nothing is stored for it, and the relay logs no error and no
    traceback (a client hanging up is not the relay's failure)."""
    ws = "vanish"
    relay: RelayProcess

    async def publish(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=relay.url, timeout=WAIT) as c:
            n = 0
            while not stop.is_set():
                n += 1
                live = [{"live": n, "i": i} for i in range(50)]
                assert (await c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=live)).is_success
                await asyncio.sleep(0)

    async def vanish() -> None:
        url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/{ws}/ws"
        stop = asyncio.Event()
        publisher = asyncio.create_task(publish(stop))
        for i in range(40):
            sock = await websockets.connect(url, max_size=None, max_queue=None)
            head = int(sock.response.headers["x-relay-head"])
            after = 0 if i % 4 < 2 else head  # a replay, or live delivery only
            await sock.send(json.dumps({"op": "sub", "after": after}))
            for _ in range(3):
                await asyncio.wait_for(sock.recv(), WAIT)
            if i % 2:
                sock.transport.abort()  # gone, no close hand-shake
            else:
                await sock.close()  # a clean close while frames are still coming
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(request("GET", f"/v1/workspaces/{ws}/events?bodies=1&after=0"))
            await reader.readuntil(b"id: ")
            writer.transport.abort()
        stop.set()
        await publisher

    with RelayProcess(env={"HIVE_RELAY_PUSH_RATE": "0"}) as relay:
        with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
            batch = [{"pad": "p" * 2000, "i": i} for i in range(400)]
            assert c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=batch).status_code == 200
        asyncio.run(vanish())
        assert_healthy(relay)
    log = relay.logs()
    assert "Traceback" not in log and " ERROR " not in log, log[log.find(" ERROR ") :][:6000]


# ------------------------------------------------------- bodies over the limit
BODY_ROUTES = [*JSON_ROUTES.values(), f"/v1/workspaces/{TARGET}/envelopes/batch"]


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(
    relay: RelayProcess, path: str
) -> None:
    """The answer arrives although not one byte of the (huge) body was sent."""
    with unchanged(relay):
        for declared in (MAX_BODY + 1, 1 << 40):
            data = request("POST", path, {"Content-Length": str(declared)})
            (answer,) = exchange(relay, data)
            assert_clean_4xx(answer, 413)


def test_body_over_the_limit_with_content_length_is_413(relay: RelayProcess) -> None:
    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        body = b'"' + b"x" * MAX_BODY + b'"'
        for path in BODY_ROUTES:
            assert_clean_4xx(c.post(path, content=body), 413)


def test_chunked_body_over_the_limit_is_413(relay: RelayProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'"'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536
        yield b'"'

    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for path in BODY_ROUTES:
            r = c.post(path, content=chunks())
            assert "content-length" not in r.request.headers
            assert_clean_4xx(r, 413)


def test_endless_chunked_body_is_cut_off_at_the_limit(relay: RelayProcess) -> None:
    """A body with no Content-Length that never ends: the relay answers 413 once it
    passes the limit, without waiting for (or buffering) the rest."""
    path = f"/v1/workspaces/{TARGET}/envelopes"
    head = request("POST", path, {"Transfer-Encoding": "chunked"})
    chunk = b"%x\r\n%s\r\n" % (16384, b"x" * 16384)
    with unchanged(relay), connect(relay) as sock:
        sock.sendall(head + b'1\r\n"\r\n')
        sent = 0
        answer = None
        buf = bytearray()
        while sent < 8 * MAX_BODY and answer is None:
            try:
                sock.sendall(chunk)
            except ConnectionError:
                break
            sent += 16384
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                buf += sock.recv(65536)
            sock.setblocking(True)
            if b"\r\n\r\n" in buf:
                answer = read_answer(sock, buf, time.monotonic() + WAIT)
        if answer is None:
            answer = read_answer(sock, buf, time.monotonic() + WAIT)
        assert answer is not None, f"no answer after {sent} bytes of body"
        assert_clean_4xx(answer, 413)
        assert sent < 8 * MAX_BODY


# ----------------------------------------------------- a lying Content-Length
def test_content_length_longer_than_the_body_then_half_close(relay: RelayProcess) -> None:
    """The client promises 100 bytes, sends 9 and stops writing: nothing is stored."""
    path = f"/v1/workspaces/{TARGET}/envelopes"
    with unchanged(relay):
        for route in (path, f"{path}/batch", f"/v1/workspaces/{TARGET}/keyring", "/v1/pair"):
            data = request("POST", route, {"Content-Length": "100"}, b'{"a":1}  ')
            answers = exchange(relay, data, shut_write=True)
            assert all(400 <= a.status < 500 for a in answers), answers


def test_content_length_longer_than_the_body_then_reset(relay: RelayProcess) -> None:
    with unchanged(relay):
        for _ in range(20):
            sock = connect(relay)
            sock.sendall(
                request(
                    "POST",
                    f"/v1/workspaces/{TARGET}/envelopes",
                    {"Content-Length": "50"},
                    b'{"a":1}',
                )
            )
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()  # RST


def test_content_length_shorter_than_the_body(relay: RelayProcess) -> None:
    """The relay reads what was declared (`{"a`, not JSON); the rest is a bad request."""
    data = request("POST", f"/v1/workspaces/{TARGET}/envelopes", {"Content-Length": "3"})
    with unchanged(relay):
        answers = exchange(relay, data + b'{"a":1}', answers=2)
        assert answers, "no answer"
        assert_clean_4xx(answers[0], 400)
        assert all(a.status == 400 for a in answers)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "abc"},
        {"Content-Length": "-1"},
        {"Content-Length": "+7"},
        {"Content-Length": "7, 7x"},
        {"Content-Length": "99999999999999999999999999"},
        {"Content-Length": "7", "Transfer-Encoding": "chunked"},
        {"Transfer-Encoding": "gzip, chunked"},
    ],
    ids=lambda h: "|".join(f"{k}={v}" for k, v in h.items()),
)
def test_unusable_framing_headers_are_refused(relay: RelayProcess, headers: dict[str, str]) -> None:
    data = request("POST", f"/v1/workspaces/{TARGET}/envelopes", headers, b'{"a":1}')
    with unchanged(relay):
        answers = exchange(relay, data)
        assert answers and 400 <= answers[0].status < 500, answers


def test_duplicate_content_lengths_are_refused(relay: RelayProcess) -> None:
    head = request("POST", f"/v1/workspaces/{TARGET}/envelopes")[:-2]
    data = head + b"Content-Length: 2\r\nContent-Length: 7\r\n\r\n{}" + b'{"a":1}'
    with unchanged(relay):
        answers = exchange(relay, data, answers=2)
        assert_parser_400(answers)


def test_bad_chunk_framing_is_refused(relay: RelayProcess) -> None:
    path = f"/v1/workspaces/{TARGET}/envelopes"
    with unchanged(relay):
        for chunks in (
            b"zz\r\n{}\r\n0\r\n\r\n",
            b"ffffffffffffffffffff\r\n{}",
            b"2\r\n{}XX0\r\n\r\n",
        ):
            data = request("POST", path, {"Transfer-Encoding": "chunked"}) + chunks
            answers = exchange(relay, data, shut_write=True)
            assert all(400 <= a.status < 500 for a in answers), answers


# ------------------------------------------------- oversized headers and URLs
def test_oversized_header_is_431(relay: RelayProcess) -> None:
    with unchanged(relay):
        for path in ("/v1/health", f"/v1/workspaces/{TARGET}/envelopes", "/nowhere"):
            (a,) = exchange(relay, request("GET", path, {"X-Big": "a" * (2 * HEADER_LIMIT)}))
            assert_clean_4xx(a, 431)
        many = {f"X-H{i}": "v" * 40 for i in range(HEADER_LIMIT // 40)}
        (a,) = exchange(relay, request("GET", "/v1/health", many))
        assert_clean_4xx(a, 431)
        big_post = request(
            "POST", f"/v1/workspaces/{TARGET}/envelopes", {"X-Big": "a" * 2 * HEADER_LIMIT}, b"{}"
        )
        (a,) = exchange(relay, big_post)
        assert_clean_4xx(a, 431)


def test_oversized_url_is_431(relay: RelayProcess) -> None:
    with unchanged(relay):
        long_ws = "w" * (2 * HEADER_LIMIT)
        for target in (
            f"/v1/workspaces/{long_ws}/envelopes",
            "/v1/health?" + "a" * (2 * HEADER_LIMIT),
            f"/v1/workspaces/{TARGET}/envelopes?after=0&" + "x=1&" * HEADER_LIMIT,
        ):
            (a,) = exchange(relay, request("GET", target))
            assert_clean_4xx(a, 431)


def test_oversized_websocket_handshakes_are_answered(relay: RelayProcess) -> None:
    """An oversized WebSocket hand-shake gets a 4xx answer. (uvicorn's websockets-sansio
    protocol leaves unsent the 431 that the websockets library prepares when it
    refuses a request head itself, at 8 KiB per line or 128 headers: the client
    then waits for ever on an open connection, and the relay holds the socket.)"""
    cases = {
        "one header over the limit": {"X-Big": "a" * (HEADER_LIMIT + 1000)},
        "130 small headers": {f"X-H{i}": "v" for i in range(130)},
    }

    async def both() -> list[list[Answer]]:
        return await asyncio.gather(
            *(
                asyncio.to_thread(exchange, relay, upgrade(f"/v1/workspaces/{TARGET}/ws", h))
                for h in cases.values()
            )
        )

    with unchanged(relay):
        results = asyncio.run(both())
    for name, answers in zip(cases, results, strict=True):
        assert answers, f"{name}: no answer to an oversized WebSocket hand-shake"
        assert 400 <= answers[0].status < 500, (name, answers[0])


def _endless(relay: RelayProcess, start: bytes, filler: bytes, most: int) -> tuple[int, bool]:
    """Send `start`, then `filler` until the relay answers or closes, or `most` bytes.

    Returns (bytes sent, whether the relay answered a 4xx or closed the connection)."""
    with connect(relay) as sock:
        sock.sendall(start)
        sent = 0
        buf = bytearray()
        while sent < most:
            try:
                sock.sendall(filler)
            except ConnectionError:
                return sent, True
            sent += len(filler)
            sock.setblocking(False)
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    return sent, True
                buf += chunk
            except BlockingIOError:
                pass
            except ConnectionError:
                return sent, True
            finally:
                sock.setblocking(True)
            if b"\r\n\r\n" in buf:
                status = int(bytes(buf).split(b" ", 2)[1])
                return sent, 400 <= status < 500
        # Loopback buffers hold megabytes: give the relay time to read and answer.
        deadline = time.monotonic() + WAIT / 4
        while b"\r\n\r\n" not in buf:
            if not recv_into(sock, buf, deadline):
                return sent, time.monotonic() < deadline  # closed, or no answer in time
        status = int(bytes(buf).split(b" ", 2)[1])
        return sent, 400 <= status < 500


@pytest.mark.parametrize(
    ("start", "filler"),
    [
        (b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Endless: ", b"a" * 16384),
        (b"GET /v1/health?", b"a" * 16384),
        (b"GET /v1/health HTTP/1.1\r\nHost: x\r\n", b"X-Many: header-value\r\n" * 700),
    ],
    ids=["header value", "URL", "header lines"],
)
def test_a_request_head_that_never_ends_is_cut_off_at_the_header_limit(
    relay: RelayProcess, start: bytes, filler: bytes
) -> None:
    """HIVE_RELAY_HEADER_LIMIT must bound what the relay buffers for a request head
    *while it arrives*, not only once it is complete: otherwise one connection
    streaming an endless header grows the relay's memory without bound (uvicorn's
    httptools protocol accumulates the head, by repeated concatenation, with no
    limit of its own) and, copying ever longer strings, starves every other request.
    """
    most = 256 * HEADER_LIMIT  # 2 MiB: 256 times what the relay promises to accept
    sent, refused = _endless(relay, start, filler, most)
    assert refused, (
        f"the relay took {sent} bytes of an unfinished request head without answering "
        f"431 or closing (HIVE_RELAY_HEADER_LIMIT={HEADER_LIMIT})"
    )
    assert_healthy(relay)


# ------------------------------------------------------- hostile workspace ids
HOSTILE_WS: dict[str, bytes] = {
    "encoded slash": b"a%2Fb",
    "encoded slash only": b"%2F",
    "encoded backslash": b"a%5Cb",
    "dot segment": b"..",
    "dot": b".",
    "encoded dot segment": b"%2e%2e",
    "mixed dot segment": b".%2E",
    "encoded NUL": b"a%00b",
    "encoded non-ASCII": b"%C3%A9t%C3%A9",
    "encoded invalid UTF-8": b"%FF%FE",
    "5,000 characters": b"w" * 5000,
    "201 characters": b"w" * 201,
    "space": b"a%20b",
    "percent sign": b"%25",
    "bad percent escape": b"%zz",
    "question mark": b"a%3Fb",
    "hash": b"a%23b",
    "semicolon": b"a;b",
    "comma": b"a,b",
    "encoded CRLF": b"a%0D%0AX-Injected:%201",
    "unicode dots": b"%E2%80%A4%E2%80%A4",
}
RAW_HOSTILE_WS: dict[str, bytes] = {
    "raw NUL": b"a\x00b",
    "raw non-ASCII": "été".encode(),
    "raw space": b"a b",
    "raw CR": b"a\rb",
    "raw tab": b"a\tb",
    "raw DEL": b"a\x7fb",
}
# Every workspace route with the methods it serves.
WS_ROUTES = {
    "envelopes": ("GET", "POST"),
    "envelopes/batch": ("POST",),
    "events": ("GET",),
    "keyring": ("GET", "POST"),
    "presence": ("GET", "POST"),
    "candidates": ("GET", "POST"),
}


def _route_requests(ws: bytes, headers: dict[str, str] | None = None) -> Iterator[bytes]:
    base = b"/v1/workspaces/" + ws + b"/"
    for route, methods in WS_ROUTES.items():
        target = base + route.encode()
        for method in methods:
            if method == "GET":
                yield request("GET", target, headers)
            else:
                device = route in ("presence", "candidates")
                body = b'{"device_id":"d","data":1}' if device else b"[1]"
                yield request(
                    "POST", target, {"Content-Type": "application/json", **(headers or {})}, body
                )


@pytest.mark.parametrize("name", HOSTILE_WS)
def test_hostile_workspace_ids_are_refused(relay: RelayProcess, name: str) -> None:
    with unchanged(relay):
        for data in _route_requests(HOSTILE_WS[name]):
            answers = exchange(relay, data)
            assert answers, data[:120]
            # 400 invalid_workspace, or 404 when the decoded path is no route at all;
            # 405 when a decoded slash lands on a route without that method.
            assert_clean_4xx(answers[0], 400, 404, 405, 431)


@pytest.mark.parametrize("name", RAW_HOSTILE_WS)
def test_raw_bytes_in_the_path_are_refused(relay: RelayProcess, name: str) -> None:
    """Bytes HTTP forbids in a request line: uvicorn's parser refuses them (400)."""
    with unchanged(relay):
        for data in _route_requests(RAW_HOSTILE_WS[name]):
            answers = exchange(relay, data)
            assert answers and 400 <= answers[0].status < 500, (data[:120], answers)


def test_hostile_workspace_ids_on_the_websocket_are_refused(relay: RelayProcess) -> None:
    with unchanged(relay):
        for name, ws in HOSTILE_WS.items():
            answers = exchange(relay, upgrade(b"/v1/workspaces/" + ws + b"/ws"))
            assert answers, name
            assert answers[0].status in (400, 403, 404), (name, answers[0])
            if answers[0].status != 403:  # uvicorn's own answer to a close before accept
                assert_clean_4xx(answers[0])


def test_trailing_slash_is_not_redirected(relay: RelayProcess) -> None:
    """An API path with a trailing slash is 404, not a redirect whose Location is
    built from the client's own Host header (Starlette's redirect_slashes)."""
    with unchanged(relay):
        for path in ("/v1/health/", f"/v1/workspaces/{TARGET}/envelopes/", "/metrics/"):
            data = request("GET", path).replace(b"Host: relay.test", b"Host: evil.example")
            (answer,) = exchange(relay, data)
            assert "location" not in answer.headers, (path, answer.headers)
            assert_clean_4xx(answer, 404)


# -------------------------------------------------- cursors and limits out of range
BAD_READ_QUERIES = {
    "after": ["-1", "18446744073709551616", "1e3", "", " 1", "0x10", "1.0", "٣", "9" * 40, "abc"],
    "limit": ["0", "10001", "-5", "", "1.5", "1e2", "99999999999999999999999"],
    "wait": ["61", "-1", "1.5", "", "3600", "99999999999999999999999"],
}


def test_cursors_and_limits_out_of_range_are_400(relay: RelayProcess) -> None:
    url = f"/v1/workspaces/{TARGET}/envelopes"
    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for name, values in BAD_READ_QUERIES.items():
            for value in values:
                r = c.get(url, params={name: value})
                assert_clean_4xx(r, 400)
                assert r.json()["error"] == f"invalid_{name}", (name, value, r.json())
        # The last of repeated parameters is the one read; a bad one is still refused.
        assert_clean_4xx(c.get(url + "?after=1&after=x"), 400)
        for value in ("-1", "18446744073709551616", "x", "1.5"):
            r = c.get(f"/v1/workspaces/{TARGET}/events", params={"bodies": "1", "after": value})
            assert_clean_4xx(r, 400)
        for value in ("-1", "x", "18446744073709551616", "1 2", "٣", "1\xa0\xa02"):
            data = request(
                "GET",
                f"/v1/workspaces/{TARGET}/events?bodies=1",
                {"Last-Event-ID": value.encode().decode("latin-1")},
            )
            (answer,) = exchange(relay, data)
            assert_clean_4xx(answer, 400)
        for value in ("2", "yes", "", "TRUE1"):
            assert_clean_4xx(c.get(f"/v1/workspaces/{TARGET}/events", params={"bodies": value}))


def test_every_cursor_on_the_event_stream_is_checked(relay: RelayProcess) -> None:
    """`after` and `Last-Event-ID` are refused when malformed whichever one the stream
    uses: with `Last-Event-ID` present, and on the nudge stream (no `bodies`), as
    /openapi.json documents them. (Found by test_fuzz.py.)"""
    url = f"/v1/workspaces/{TARGET}/events"
    with unchanged(relay):
        for query, headers in (
            ("?after=18446744073709551616", {}),
            ("?bodies=0&after=-1", {}),
            ("?bodies=1&after=x", {"Last-Event-ID": "5"}),
            ("", {"Last-Event-ID": "x"}),
        ):
            # Only the head is read: an accepted stream would never end.
            (answer,) = exchange(relay, request("GET", url + query, headers))
            assert_clean_4xx(answer, 400)


def test_both_dedup_headers_are_checked(relay: RelayProcess) -> None:
    """`X-Hive-Event-Id` is 1–200 characters even when `Idempotency-Key` wins
    (design.md; found by test_fuzz.py)."""
    url = f"/v1/workspaces/{TARGET}/envelopes"
    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for headers in (
            {"Idempotency-Key": "k1", "X-Hive-Event-Id": "e" * 201},
            {"Idempotency-Key": "k1", "X-Hive-Event-Id": ""},
            {"Idempotency-Key": "", "X-Hive-Event-Id": "e1"},
        ):
            r = c.post(url, json={"dedup": 1}, headers=headers)
            assert_clean_4xx(r, 400)
            assert r.json()["error"] == "invalid_idempotency_key"


# ------------------------------------------------------------ malformed tokens
MALFORMED_AUTH: dict[str, bytes] = {
    "missing": b"",
    "empty": b"",
    "scheme only": b"Bearer",
    "scheme and spaces": b"Bearer    ",
    "wrong scheme": b"Basic " + TOKEN.encode(),
    "no scheme": TOKEN.encode(),
    "token with a suffix": b"Bearer " + TOKEN.encode() + b"x",
    "token prefix": b"Bearer " + TOKEN[:-1].encode(),
    "two tokens": b"Bearer " + TOKEN.encode() + b" " + TOKEN.encode(),
    "Latin-1 bytes": b"Bearer \xff\xfe\xe9",
    "UTF-8 bytes": "Bearer tökén".encode(),
    "8,000 characters": b"Bearer " + b"t" * 8000,
    "hrt1, empty": b"Bearer hrt1.",
    "hrt1, garbage": b"Bearer hrt1.%%%.%%%",
    "hrt1, three parts": b"Bearer hrt1.e30.e30.e30",
    "hrt1, not base64": b"Bearer hrt1.!!!!.????",
}


@pytest.fixture(scope="module")
def gated() -> Iterator[RelayProcess]:
    env = {
        "HIVE_RELAY_ACCESS_TOKENS": TOKEN,
        "HIVE_RELAY_HEADER_LIMIT": str(HEADER_LIMIT * 2),
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_PAIR_RESOLVE_RATE": "0",
    }
    with RelayProcess(env=env) as proc:
        seed(proc, {"Authorization": f"Bearer {TOKEN}"})
        yield proc
        assert_healthy(proc)
    log = proc.logs()
    assert "Traceback" not in log
    assert TOKEN not in log


@pytest.mark.parametrize("name", MALFORMED_AUTH)
def test_malformed_tokens_are_401(gated: RelayProcess, name: str) -> None:
    value = MALFORMED_AUTH[name]
    extra = {} if name == "missing" else {"Authorization": value.decode("latin-1")}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with unchanged(gated, auth):
        for data in _route_requests(TARGET.encode(), extra):
            (answer,) = exchange(gated, data)
            assert_clean_4xx(answer, 401)
            assert answer.headers.get("www-authenticate", "").startswith("Bearer")
        (answer,) = exchange(gated, request("POST", "/v1/pair", extra, b'{"payload":"p"}'))
        assert_clean_4xx(answer, 401)


def test_duplicate_authorization_headers_are_not_a_way_in(gated: RelayProcess) -> None:
    head = request("GET", f"/v1/workspaces/{TARGET}/envelopes")[:-2]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with unchanged(gated, auth):
        for first, second in ((b"Bearer wrong", TOKEN.encode()), (b"Basic x", b"Bearer wrong")):
            data = head + b"Authorization: " + first + b"\r\nAuthorization: " + second + b"\r\n\r\n"
            (answer,) = exchange(gated, data)
            assert answer.status in (200, 401), answer
            if answer.status == 401:
                assert_clean_4xx(answer, 401)


def test_malformed_tokens_on_the_websocket_are_401(gated: RelayProcess) -> None:
    async def scenario() -> list[int]:
        url = f"ws://127.0.0.1:{gated.port}/v1/workspaces/{TARGET}/ws"
        statuses = []
        for offer in (
            {"additional_headers": {"Authorization": "Bearer wrong"}},
            {"subprotocols": ["bearer.wrong"]},
            {"subprotocols": ["bearer."]},
            {"subprotocols": ["bearer"]},
            {},
        ):
            with pytest.raises(websockets.InvalidStatus) as err:
                async with websockets.connect(url, **offer):  # type: ignore[arg-type]
                    pass
            statuses.append(err.value.response.status_code)
            assert json.loads(err.value.response.body)["error"] == "unauthorized"
        return statuses

    with unchanged(gated, {"Authorization": f"Bearer {TOKEN}"}):
        assert asyncio.run(scenario()) == [401] * 5


# ---------------------------------------------- side-channel bodies of the wrong shape
WRONG_DEVICE_BODIES = [
    b"[]",
    b'"device"',
    b"1",
    b"null",
    b"{}",
    b'{"data":1}',
    b'{"device_id":5}',
    b'{"device_id":null}',
    b'{"device_id":["d"]}',
    b'{"device_id":""}',
    b'{"device_id":"' + b"d" * 201 + b'"}',
    b'{"device_id":"d","data":NaN}',
    b'{"device_id":"d","device_id":5}',
]
WRONG_PAIR_BODIES = [
    b"[]",
    b'"p"',
    b"{}",
    b'{"payload":5}',
    b'{"payload":null}',
    b'{"payload":["p"]}',
    b'{"payload":""}',
    b'{"payload":"p","ttl_secs":"600"}',
    b'{"payload":"p","ttl_secs":1.5}',
    b'{"payload":"p","ttl_secs":true}',
    b'{"payload":"' + b"p" * 8193 + b'"}',
]


def test_side_channel_bodies_of_the_wrong_shape_are_refused(relay: RelayProcess) -> None:
    with unchanged(relay), httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for channel in ("presence", "candidates"):
            for body in WRONG_DEVICE_BODIES:
                r = c.post(f"/v1/workspaces/{TARGET}/{channel}", content=body)
                assert_clean_4xx(r, 400)
            big = b'{"device_id":"d","data":"' + b"x" * 5000 + b'"}'
            assert_clean_4xx(c.post(f"/v1/workspaces/{TARGET}/{channel}", content=big), 413)
        for body in WRONG_PAIR_BODIES:
            r = c.post("/v1/pair", content=body)
            assert_clean_4xx(r, 400, 413)
        big = b'"' + b"k" * 5000 + b'"'
        assert_clean_4xx(c.post(f"/v1/workspaces/{TARGET}/keyring", content=big), 413)


# ------------------------------------------------------------- floods and caps
@pytest.fixture(scope="module")
def limited() -> Iterator[RelayProcess]:
    """Small per-client limits; the test process is a trusted proxy, so each test can
    speak for clients of its own with X-Forwarded-For."""
    env = {
        "HIVE_RELAY_PUSH_RATE": "0.001",
        "HIVE_RELAY_PUSH_BURST": "20",
        "HIVE_RELAY_PAIR_RESOLVE_RATE": "0.001",
        "HIVE_RELAY_MAX_SSE": "8",
        "HIVE_RELAY_MAX_SSE_PER_CLIENT": "3",
        "HIVE_RELAY_TRUSTED_PROXIES": "127.0.0.1",
        "HIVE_RELAY_KEEPALIVE_SECS": "1",
    }
    with RelayProcess(env=env) as proc:
        yield proc
        assert_healthy(proc)
    assert "Traceback" not in proc.logs()


def assert_retry_after(r: httpx.Response | Answer) -> None:
    headers = r.headers
    assert int(headers["retry-after"]) >= 1, headers


def test_pairing_code_walking_is_rate_limited(limited: RelayProcess) -> None:
    walker = as_client("10.0.1.1")
    with httpx.Client(base_url=limited.url, timeout=WAIT) as c:
        code = c.post("/v1/pair", json={"payload": "secret"}, headers=walker).json()["code"]
        before = gauges(limited)
        answers = []
        for i in range(40):
            guess = f"{i:06d}" if f"{i:06d}" != code else "ZZZZZZ"
            answers.append(c.get(f"/v1/pair/{guess}", headers=walker))
        statuses = [r.status_code for r in answers]
        assert statuses[:10] == [404] * 10, statuses  # the burst
        assert statuses[10:] == [429] * 30, statuses
        for r in answers[10:]:
            assert_clean_4xx(r, 429)
            assert_retry_after(r)
        # The walker cannot find even the right code now; another client can.
        assert c.get(f"/v1/pair/{code}", headers=walker).status_code == 429
        other = c.get(f"/v1/pair/{code}", headers=as_client("10.0.1.2"))
        assert other.json() == {"payload": "secret"}
        # Normalized spellings of a code cost the same.
        for spelling in (code.lower(), code[:3] + "-" + code[3:], " ".join(code)):
            assert c.get(f"/v1/pair/{spelling}", headers=walker).status_code == 429
        assert gauges(limited) == before
    assert_healthy(limited)


def test_push_flood_is_429_and_appends_nothing_past_the_burst(limited: RelayProcess) -> None:
    flooder = as_client("10.0.2.1")
    ws = "flood"
    with httpx.Client(base_url=limited.url, timeout=WAIT) as c:
        answers = [
            c.post(f"/v1/workspaces/{ws}/envelopes", json={"i": i}, headers=flooder)
            for i in range(25)
        ]
        answers += [
            c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=[{"b": i}], headers=flooder)
            for i in range(5)
        ]
        ok = [r for r in answers if r.status_code == 200]
        limited_answers = [r for r in answers if r.status_code == 429]
        assert len(ok) + len(limited_answers) == len(answers)
        assert len(ok) >= 20 and limited_answers, [r.status_code for r in answers]
        for r in limited_answers:
            assert_clean_4xx(r, 429)
            assert r.json()["error"] == "rate_limited"
            assert_retry_after(r)
        rows = c.get(f"/v1/workspaces/{ws}/envelopes").json()
        acked = sorted(s for r in ok for s in (r.json().get("seqs") or [r.json()["seq"]]))
        assert [row["seq"] for row in rows] == acked  # every 429 appended nothing
        # Another client is not held back by the flooder.
        r = c.post(f"/v1/workspaces/{ws}/envelopes", json={"x": 1}, headers=as_client("10.0.2.2"))
        assert r.status_code == 200

    async def ws_flood() -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{limited.port}/v1/workspaces/{ws}/ws"
        async with websockets.connect(url, additional_headers=flooder) as sock:
            for i in range(5):
                await sock.send(json.dumps({"op": "pub", "body": {"w": i}, "ref": i}))
            return [json.loads(await asyncio.wait_for(sock.recv(), WAIT)) for _ in range(5)]

    before = gauges(limited)
    frames = asyncio.run(ws_flood())
    assert [f["op"] for f in frames] == ["error"] * 5, frames
    assert all(f["error"] == "rate_limited" and f["retry_after"] >= 1 for f in frames)
    assert gauges(limited) == before
    assert_healthy(limited)


def open_sse(relay: RelayProcess, ws: str, who: str) -> tuple[socket.socket | None, Answer | None]:
    """An SSE stream held open on a raw socket as client `who`: (socket, None) once
    `: connected` arrives, or (None, the refusal)."""
    sock = connect(relay)
    sock.sendall(
        request("GET", f"/v1/workspaces/{ws}/events", as_client(who)).replace(
            b"Connection: close\r\n", b""
        )
    )
    buf = bytearray()
    deadline = time.monotonic() + WAIT
    while b"\r\n\r\n" not in buf:
        assert recv_into(sock, buf, deadline), "no answer to an SSE request"
    if buf.startswith(b"HTTP/1.1 200"):
        while b": connected" not in buf:
            assert recv_into(sock, buf, deadline), "the stream did not start"
        return sock, None
    answer = read_answer(sock, buf, deadline)
    sock.close()
    return None, answer


def test_stream_floods_past_the_caps_are_503_with_retry_after(limited: RelayProcess) -> None:
    """3 live streams per client, 8 in all: SSE, WebSocket and long-poll count alike."""
    ws = "streams"
    held: list[socket.socket] = []

    def sse(who: str) -> int:
        sock, refusal = open_sse(limited, ws, who)
        if sock is not None:
            held.append(sock)
            return 200
        assert refusal is not None
        assert_clean_4xx(refusal, 503)
        assert_retry_after(refusal)
        return refusal.status

    async def socket_(who: str, stack: contextlib.AsyncExitStack) -> int:
        url = f"ws://127.0.0.1:{limited.port}/v1/workspaces/{ws}/ws"
        try:
            await stack.enter_async_context(
                websockets.connect(url, additional_headers=as_client(who))
            )
        except websockets.InvalidStatus as err:
            assert int(err.response.headers["retry-after"]) >= 1
            assert json.loads(err.response.body)["error"].startswith("too_many_streams")
            return err.response.status_code
        return 101

    async def long_poll(c: httpx.AsyncClient, who: str) -> httpx.Response:
        return await c.get(f"/v1/workspaces/{ws}/envelopes?after=0&wait=60", headers=as_client(who))

    async def live_streams(c: httpx.AsyncClient) -> float:
        text = (await c.get("/metrics")).text
        m = re.search(r"^hive_relay_live_streams (\S+)$", text, re.M)
        assert m
        return float(m.group(1))

    async def wait_streams(c: httpx.AsyncClient, n: int) -> None:
        deadline = time.monotonic() + WAIT
        while await live_streams(c) != n:
            assert time.monotonic() < deadline, f"live streams never reached {n}"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(base_url=limited.url, timeout=httpx.Timeout(WAIT, read=90)) as c,
            contextlib.AsyncExitStack() as stack,
        ):
            # Client A: three SSE streams, then every kind of stream is refused.
            assert [sse("10.0.3.1") for _ in range(3)] == [200] * 3
            assert sse("10.0.3.1") == 503
            assert await socket_("10.0.3.1", stack) == 503
            r = await long_poll(c, "10.0.3.1")
            assert_clean_4xx(r, 503)
            assert r.json()["error"] == "too_many_streams_for_client"
            assert_retry_after(r)
            # Client B: a WebSocket, an SSE stream and a long-poll.
            assert await socket_("10.0.3.2", stack) == 101
            assert sse("10.0.3.2") == 200
            poll = asyncio.create_task(long_poll(c, "10.0.3.2"))
            await wait_streams(c, 6)
            # Client C: two more reach the relay-wide cap of 8; the next is refused.
            assert sse("10.0.3.3") == 200
            assert await socket_("10.0.3.3", stack) == 101
            assert sse("10.0.3.4") == 503
            r = await c.get(f"/v1/workspaces/{ws}/events", headers=as_client("10.0.3.4"))
            assert_clean_4xx(r, 503)
            assert r.json()["error"] == "too_many_streams"
            assert_retry_after(r)
            # The relay still answers everything that is not a stream.
            assert (await c.get("/v1/health")).status_code == 200
            pushed = await c.post(
                f"/v1/workspaces/{ws}/envelopes", json={"wake": 1}, headers=as_client("10.0.3.5")
            )
            assert pushed.status_code == 200
            assert (await poll).json()[0]["body"] == {"wake": 1}  # the long-poll answered
            for sock in held[:3]:  # client A hangs up: its slots come back
                sock.close()
            await wait_streams(c, 4)
            assert sse("10.0.3.1") == 200

    try:
        asyncio.run(scenario())
    finally:
        for sock in held:
            sock.close()
    assert_healthy(limited)


# ------------------------------------------------------------------ slowloris
def test_hundreds_of_half_open_connections_do_not_starve_health(relay: RelayProcess) -> None:
    """300 unfinished request heads, 200 silent connections and 100 unfinished
    bodies, all held open: /v1/health and a push still answer."""
    socks: list[socket.socket] = []
    try:
        for i in range(300):
            s = connect(relay)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow-" + str(i).encode() + b": ")
            socks.append(s)
        socks += [connect(relay) for _ in range(200)]
        for _ in range(100):
            s = connect(relay)
            s.sendall(
                request("POST", f"/v1/workspaces/{TARGET}/envelopes", {"Content-Length": "1000"})
                + b'{"slow":'
            )
            socks.append(s)
        with unchanged(relay):
            for _ in range(5):
                assert httpx.get(relay.url + "/v1/health", timeout=WAIT).status_code == 200
    finally:
        for s in socks:
            s.close()
    assert_healthy(relay)


@pytest.fixture(scope="module")
def quick_timeouts() -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_KEEPALIVE_TIMEOUT": "1"}) as proc:
        yield proc


SLOW_OPENINGS: dict[str, tuple[bytes, bytes]] = {
    # name: (sent at once, then trickled one byte a second)
    "silent": (b"", b""),
    "unfinished head": (b"GET /v1/health HTTP/1.1\r\nHost: x\r\n", b""),
    "trickled head": (b"GET /v1/health HTTP/1.1\r\n", b"X-Slowloris: " + b"a" * 60),
    "unfinished body": (
        b"POST /v1/workspaces/w/envelopes HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
        b"",
    ),
}


def test_idle_and_unfinished_requests_are_dropped(quick_timeouts: RelayProcess) -> None:
    """A connection that does not deliver a whole request in good time is closed,
    so a slowloris cannot hold the relay's sockets (and memory) for ever. uvicorn
    has no such timeout: its keep-alive timer only runs between requests. The
    relay runs with HIVE_RELAY_KEEPALIVE_TIMEOUT=1 here; 20 s is a generous bound."""
    socks = {name: connect(quick_timeouts) for name in SLOW_OPENINGS}
    pending = {name: bytearray(trickle) for name, (_, trickle) in SLOW_OPENINGS.items()}
    open_ = set(socks)
    try:
        for name, (opening, _) in SLOW_OPENINGS.items():
            socks[name].sendall(opening)
            socks[name].setblocking(False)
        deadline = time.monotonic() + WAIT
        while open_ and time.monotonic() < deadline:
            time.sleep(1.0)
            for name in sorted(open_):
                sock = socks[name]
                try:
                    if sock.recv(65536) == b"":
                        open_.discard(name)
                        continue
                except BlockingIOError:
                    pass
                except ConnectionError:
                    open_.discard(name)
                    continue
                if pending[name]:
                    with contextlib.suppress(BlockingIOError, ConnectionError):
                        sock.send(bytes(pending[name][:1]))
                        del pending[name][:1]
    finally:
        for sock in socks.values():
            sock.close()
    assert not open_, f"still open after {WAIT:.0f} s (HIVE_RELAY_KEEPALIVE_TIMEOUT=1): {open_}"
    assert_healthy(quick_timeouts)


def test_slow_but_steady_requests_are_not_cut_off(quick_timeouts: RelayProcess) -> None:
    """The stall timeout bounds each pause, not the whole request or connection: a
    body trickled in chunks 0.4 s apart for about 3 s (three times the 1 s
    timeout) is accepted, and one keep-alive connection that asks again every
    0.4 s stays open across many timeouts. Each chunk and each request moves the
    deadline (relay/server.py keeps one lazy timer per connection)."""
    body = json.dumps({"steady": "x" * 60}).encode()
    chunks = [body[i : i + 10] for i in range(0, len(body), 10)]
    assert len(chunks) >= 7
    with connect(quick_timeouts) as sock:
        sock.sendall(
            b"POST /v1/workspaces/steady/envelopes HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for chunk in chunks:
            time.sleep(0.4)
            sock.sendall(chunk)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        for _ in range(8):
            time.sleep(0.4)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok"), answer
    rows = httpx.get(quick_timeouts.url + "/v1/workspaces/steady/envelopes", timeout=WAIT).json()
    assert [row["body"] for row in rows] == [json.loads(body)]
