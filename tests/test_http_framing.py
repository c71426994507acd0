"""HTTP/1.1 framing on one connection, through real relay processes and raw sockets.

The rule under test (relay/server.py, docs/design.md "HTTP framing"):

* An answer given before its request's body has all arrived (413, 401, 400, 404…)
  never lets the rest of that body be read as a request. When the body is at
  most 64 KiB (by Content-Length), the relay reads and drops the rest and the
  connection stays usable. Otherwise (more, chunked, or `Expect:
  100-continue`) the answer says `connection: close`, the relay discards what the
  client still sends, and the connection ends after exactly that one answer.
* Pipelined requests are answered one each, in order, wherever the reads split
  them; the head-size guard counts only the head in progress.
* The relay's own 400/431 for a bad head comes after the answers owed to the
  requests pipelined before it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from client import AsyncRelayClient, PayloadTooLarge, RelayClient
from tests.relayproc import RelayProcess

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

WAIT = 30.0
MAX_BODY = 4 * 1024 * 1024  # the default HIVE_RELAY_MAX_BODY_BYTES
SMALL_LIMIT = 1000  # HIVE_RELAY_MAX_BODY_BYTES of the `small` relay
TOKEN = "framing-token"
HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: relay.test\r\n\r\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return "close" in self.headers.get("connection", "").lower()

    def error(self) -> str:
        decoded = json.loads(self.body)
        assert set(decoded) == {"error", "message"}, decoded
        return str(decoded["error"])


@dataclass
class Reader:
    """Answers parsed off one socket, in order; `eof` once the relay closed."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False

    def _fill(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def answer(self, timeout: float = WAIT) -> Answer | None:
        """The next whole answer, or None if the relay closed first."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if self.eof or not self._fill(deadline):
                assert not self.buf, f"the relay closed inside an answer head: {self.buf!r}"
                return None
        head, _, _ = bytes(self.buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        end = len(head) + 4 + length
        while len(self.buf) < end:
            assert not self.eof and self._fill(deadline), "the relay closed inside a body"
        body = bytes(self.buf[len(head) + 4 : end])
        del self.buf[:end]
        return Answer(int(lines[0].split(" ")[1]), headers, body)

    def answers_until_eof(self, timeout: float = WAIT) -> list[Answer]:
        out = []
        while (one := self.answer(timeout)) is not None:
            out.append(one)
        return out


def connect(relay: RelayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: relay.test"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(data: bytes, size: int = 16384) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def stored(relay: RelayProcess, ws: str, token: str | None = None, after: int = 0) -> list[object]:
    """The bodies the relay holds for `ws` after seq `after`, oldest first."""
    auth = {"authorization": f"Bearer {token}"} if token else {}
    url = f"{relay.url}/v1/workspaces/{ws}/envelopes?after={after}&limit=1000"
    r = httpx.get(url, headers=auth, timeout=WAIT)
    assert r.status_code == 200, r.text
    return [e["body"] for e in r.json()]


@pytest.fixture(scope="module")
def relays() -> Iterator[dict[str, RelayProcess]]:
    with (
        RelayProcess(env={"HIVE_RELAY_PUSH_RATE": "0"}) as default,
        RelayProcess(env={"HIVE_RELAY_ACCESS_TOKENS": TOKEN}) as gated,
        RelayProcess(env={"HIVE_RELAY_MAX_BODY_BYTES": str(SMALL_LIMIT)}) as small,
    ):
        yield {"default": default, "gated": gated, "small": small}


# ------------------------------------------------------------ early refusals
@dataclass(frozen=True)
class Refusal:
    """A request the relay answers before reading its body."""

    relay: str
    target: str
    declared: int  # Content-Length (0: chunked)
    status: int
    code: str
    closes: bool  # the answer says connection: close (else the rest is drained)
    headers: tuple[tuple[str, str], ...] = ()


WS = "framing"
REFUSALS = {
    # 413 by Content-Length: megabytes still to come, so the relay closes.
    "413": Refusal(
        "default",
        f"/v1/workspaces/{WS}/envelopes",
        6 * 1024 * 1024,
        413,
        "payload_too_large",
        True,
    ),
    # 413 for a short body (a small HIVE_RELAY_MAX_BODY_BYTES): drained, kept.
    "413-short-rest": Refusal(
        "small",
        f"/v1/workspaces/{WS}/envelopes",
        5 * SMALL_LIMIT,
        413,
        "payload_too_large",
        False,
    ),
    "401": Refusal(
        "gated", f"/v1/workspaces/{WS}/envelopes", 1024 * 1024, 401, "unauthorized", True
    ),
    "401-short-rest": Refusal(
        "gated", f"/v1/workspaces/{WS}/envelopes", 40000, 401, "unauthorized", False
    ),
    "400": Refusal(
        "default",
        "/v1/workspaces/bad$id/envelopes",
        1024 * 1024,
        400,
        "invalid_workspace",
        True,
    ),
    "400-short-rest": Refusal(
        "default", "/v1/workspaces/bad$id/envelopes", 30000, 400, "invalid_workspace", False
    ),
    "404": Refusal(
        "default", f"/v1/workspaces/a%2F{WS}/envelopes", 1024 * 1024, 404, "not_found", True
    ),
    "404-short-rest": Refusal(
        "default", f"/v1/workspaces/a%2F{WS}/envelopes", 30000, 404, "not_found", False
    ),
}


def refused_request(case: Refusal) -> tuple[bytes, bytes]:
    """(head, body) of a JSON string body of exactly `case.declared` bytes."""
    body = b'"' + b"x" * (case.declared - 2) + b'"'
    return (
        head(
            "POST",
            case.target,
            {
                "Content-Type": "application/json",
                "Content-Length": str(case.declared),
                **dict(case.headers),
            },
        ),
        body,
    )


def check_refusal(case: Refusal, answer: Answer | None) -> None:
    assert answer is not None, "no answer"
    assert answer.status == case.status, (answer.status, answer.body[:200])
    assert answer.error() == case.code
    assert answer.closes is case.closes, answer.headers


def finish(reader: Reader, case: Refusal) -> None:
    """After the refusal, with a probe request sent: the relay has closed after
    exactly one answer, or the next answer is the probe's."""
    if case.closes:
        assert [(a.status, a.body) for a in reader.answers_until_eof()] == []
        assert reader.eof
    else:
        probe = reader.answer()
        assert probe is not None and (probe.status, probe.body) == (200, b"ok")


def send_probe(sock: socket.socket, data: bytes, case: Refusal) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        assert case.closes  # a kept connection never refuses what follows


@pytest.mark.parametrize("pipelined", [False, True], ids=["then-probe", "pipelined-probe"])
@pytest.mark.parametrize("name", list(REFUSALS))
def test_partial_body_then_the_rest(
    relays: dict[str, RelayProcess], name: str, pipelined: bool
) -> None:
    """The client sends part of the body, reads the early answer, then sends the
    rest and a probe request (in the same write, or after reading once more)."""
    case = REFUSALS[name]
    relay = relays[case.relay]
    head_bytes, body = refused_request(case)
    first = min(len(body) // 4, 400 * 1024)
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(head_bytes + body[:first])
        check_refusal(case, reader.answer())
        send_probe(sock, body[first:] + (HEALTH if pipelined else b""), case)
        if not pipelined:
            time.sleep(0.05)  # the rest and the probe in separate reads
            send_probe(sock, HEALTH, case)
        finish(reader, case)
    token = TOKEN if case.relay == "gated" else None
    assert stored(relay, WS, token) == []


@pytest.mark.parametrize("pipelined", [False, True], ids=["then-probe", "pipelined-probe"])
@pytest.mark.parametrize("name", list(REFUSALS))
def test_whole_body_in_one_write(
    relays: dict[str, RelayProcess], name: str, pipelined: bool
) -> None:
    """Head and whole body (and the probe) in one write, before any answer."""
    case = REFUSALS[name]
    relay = relays[case.relay]
    head_bytes, body = refused_request(case)
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(head_bytes + body + (HEALTH if pipelined else b""))
        answer = reader.answer()
        assert answer is not None and answer.status == case.status, answer
        assert answer.error() == case.code
        # All of the body may have arrived before the answer: then nothing is
        # left over and the connection may stay open, whatever the size.
        if not answer.closes:
            case = Refusal(**{**case.__dict__, "closes": False})
        if not pipelined:
            send_probe(sock, HEALTH, case)
        finish(reader, case)
    token = TOKEN if case.relay == "gated" else None
    assert stored(relay, WS, token) == []


# ------------------------------------------------------------ chunked bodies
CHUNKED = {
    "413": ("small", f"/v1/workspaces/{WS}/envelopes", 413, "payload_too_large"),
    "401": ("gated", f"/v1/workspaces/{WS}/envelopes", 401, "unauthorized"),
    "400": ("default", "/v1/workspaces/bad$id/envelopes", 400, "invalid_workspace"),
    "404": ("default", f"/v1/workspaces/a%2F{WS}/envelopes", 404, "not_found"),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["then-probe", "pipelined-probe"])
@pytest.mark.parametrize("name", list(CHUNKED))
def test_chunked_body_answered_early_closes(
    relays: dict[str, RelayProcess], name: str, pipelined: bool
) -> None:
    """A chunked body's rest has no known length: an early answer always closes,
    and nothing the client sends after it (the rest, a next request) is parsed."""
    kind, target, status, code = CHUNKED[name]
    relay = relays[kind]
    body = chunked(b'"' + b"x" * (300 * 1024) + b'"', 4096)
    cut = body.index(b"\r\n", 8192) + 2  # the first chunks, ending between two
    case = Refusal(kind, target, 0, status, code, closes=True)
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(head("POST", target, {"Transfer-Encoding": "chunked"}) + body[:cut])
        check_refusal(case, reader.answer())
        send_probe(sock, body[cut:] + (HEALTH if pipelined else b""), case)
        if not pipelined:
            time.sleep(0.05)
            send_probe(sock, HEALTH, case)
        finish(reader, case)
    token = TOKEN if kind == "gated" else None
    assert stored(relay, WS, token) == []


@pytest.mark.parametrize("name", list(CHUNKED))
def test_whole_chunked_body_and_a_pipelined_request(
    relays: dict[str, RelayProcess], name: str
) -> None:
    """All of it in one write: one answer then the probe's, or one answer and a close."""
    kind, target, status, code = CHUNKED[name]
    relay = relays[kind]
    body = chunked(b'"' + b"x" * (SMALL_LIMIT * 3) + b'"', 512)
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(head("POST", target, {"Transfer-Encoding": "chunked"}) + body + HEALTH)
        answer = reader.answer()
        assert answer is not None and answer.status == status and answer.error() == code
        finish(reader, Refusal(kind, target, 0, status, code, closes=answer.closes))


def test_a_small_chunked_body_on_a_kept_connection(relays: dict[str, RelayProcess]) -> None:
    """Chunked pushes and reads pipelined on one connection are all answered, in order."""
    relay = relays["default"]
    ws = "framing-chunked"
    pushes = [
        head("POST", f"/v1/workspaces/{ws}/envelopes", {"Transfer-Encoding": "chunked"})
        + chunked(b'{"n":%d,"pad":"%s"}' % (i, b"p" * 300), 7)
        for i in range(20)
    ]
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(b"".join(pushes) + HEALTH)
        seqs = []
        for _ in pushes:
            answer = reader.answer()
            assert answer is not None and answer.status == 200, answer
            seqs.append(json.loads(answer.body)["seq"])
        probe = reader.answer()
        assert probe is not None and (probe.status, probe.body) == (200, b"ok")
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [b["n"] for b in stored(relay, ws)] == list(range(20))  # type: ignore[index]


# ---------------------------------------------------------- Expect: 100-continue
def test_early_answer_to_a_client_waiting_for_100_continue_closes(
    relays: dict[str, RelayProcess],
) -> None:
    """A client that asked `Expect: 100-continue` may never send the body after an
    early final answer: the relay cannot read on safely, so it closes."""
    relay = relays["gated"]
    target = f"/v1/workspaces/{WS}/envelopes"
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(head("POST", target, {"Content-Length": "100", "Expect": "100-continue"}))
        answer = reader.answer()
        assert answer is not None and answer.status == 401 and answer.closes, answer
        send_probe(sock, HEALTH, Refusal("gated", target, 100, 401, "unauthorized", True))
        assert reader.answers_until_eof() == []


def test_100_continue_then_the_body_is_stored(relays: dict[str, RelayProcess]) -> None:
    relay = relays["default"]
    ws = "framing-continue"
    body = b'{"continued":true}'
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(
            head(
                "POST",
                f"/v1/workspaces/{ws}/envelopes",
                {"Content-Length": str(len(body)), "Expect": "100-continue"},
            )
        )
        sock.settimeout(WAIT)
        while b"\r\n\r\n" not in reader.buf:
            assert reader._fill(time.monotonic() + WAIT)
        assert bytes(reader.buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del reader.buf[: len(b"HTTP/1.1 100 Continue\r\n\r\n")]
        sock.sendall(body + HEALTH)
        answer = reader.answer()
        assert answer is not None and answer.status == 200 and not answer.closes, answer
        probe = reader.answer()
        assert probe is not None and (probe.status, probe.body) == (200, b"ok")
    assert stored(relay, ws) == [{"continued": True}]


# ------------------------------------------------------------------- the SDK
def test_both_sdks_report_an_oversized_body_as_payload_too_large(
    relays: dict[str, RelayProcess],
) -> None:
    """Not `Unreachable` (retryable): the async client used to lose the 413 to a reset."""
    relay = relays["default"]
    big = {"pad": "x" * (MAX_BODY + 1024 * 1024)}
    with RelayClient(relay.url) as sync_client:
        for _ in range(3):
            with pytest.raises(PayloadTooLarge):
                sync_client.push(WS, big)

    async def run() -> None:
        async with AsyncRelayClient(relay.url) as client:
            for _ in range(3):
                with pytest.raises(PayloadTooLarge):
                    await client.push(WS, big)
            assert (await client.push(WS + "-after", {"ok": 1})).seq > 0

    asyncio.run(run())
    assert stored(relay, WS) == []


# ---------------------------------------------------------------- pipelining
def posts(ws: str, count: int, pad: int, first: int = 0) -> list[bytes]:
    """`count` push requests, each about 550 bytes; body i holds {"i": first + i}."""
    out = []
    for i in range(first, first + count):
        body = b'{"i":%d,"pad":"' % i
        body += b"p" * (pad - len(body) - 2) + b'"}'
        out.append(
            head(
                "POST",
                f"/v1/workspaces/{ws}/envelopes",
                {"Content-Type": "application/json", "Content-Length": str(len(body))},
            )
            + body
        )
    return out


def send_in_pieces(
    sock: socket.socket, reader: Reader, requests: list[bytes], cuts: list[int]
) -> list[int]:
    """Send the requests as one byte stream cut at `cuts`, each piece only once the
    relay has answered every request the pieces so far hold whole (so that each
    cut is where one of the relay's reads ends). Returns the seqs, in order."""
    stream = b"".join(requests)
    ends = []
    total = 0
    for r in requests:
        total += len(r)
        ends.append(total)
    seqs: list[int] = []

    def take(upto: int) -> None:
        while len(seqs) < upto:
            answer = reader.answer()
            assert answer is not None, f"closed after {len(seqs)} answers"
            assert answer.status == 200, (len(seqs), answer.status, answer.body[:200])
            seqs.append(json.loads(answer.body)["seq"])

    at = 0
    for cut in [*cuts, len(stream)]:
        sock.sendall(stream[at:cut])
        at = cut
        take(sum(1 for end in ends if end <= cut))
    assert reader.buf == b""
    return seqs


def check_order(seqs: list[int], count: int) -> None:
    assert len(seqs) == count
    assert all(a < b for a, b in itertools.pairwise(seqs)), seqs


def test_200_pipelined_posts_in_one_write(relays: dict[str, RelayProcess]) -> None:
    """The issue's case: 64 rounds of 200 pushes in one write, bodies 440-471 bytes,
    on fresh and reused connections; each read may end anywhere."""
    relay = relays["default"]
    ws = "framing-pipe"
    sock = connect(relay)
    try:
        for round_ in range(64):
            if round_ % 2 == 0:
                sock.close()
                sock = connect(relay)
            requests = posts(ws, 200, 440 + round_ % 32, first=round_ * 200)
            seqs = send_in_pieces(sock, Reader(sock), requests, [])
            check_order(seqs, 200)
    finally:
        sock.close()
    last = stored(relay, ws, after=seqs[0] - 1)
    assert [b["i"] for b in last] == list(range(63 * 200, 64 * 200))  # type: ignore[index]


def test_pipelined_posts_cut_at_every_offset_of_a_window(
    relays: dict[str, RelayProcess],
) -> None:
    """The same stream of 40 pushes cut once at every offset across one whole
    request (head and body) past the first 16 KiB: every request is answered,
    in order, wherever the read ends."""
    relay = relays["default"]
    ws = "framing-window"
    requests = posts(ws, 40, 460)
    size = len(requests[0])
    start = sum(len(r) for r in requests[:31])
    assert start > 16384 + size
    sock = connect(relay)
    try:
        for i, cut in enumerate(range(start, start + size + 1)):
            if i % 50 == 0:  # fresh connections now and then, else reused
                sock.close()
                sock = connect(relay)
            check_order(send_in_pieces(sock, Reader(sock), requests, [cut]), 40)
    finally:
        sock.close()


def test_pipelined_posts_cut_at_random_offsets(relays: dict[str, RelayProcess]) -> None:
    """200 pushes cut at random places (fixed seed): heads, bodies and the bytes
    between requests all end reads somewhere."""
    relay = relays["default"]
    ws = "framing-random"
    rng = random.Random(1118)
    for _ in range(12):
        requests = posts(ws, 200, 440 + rng.randrange(32))
        total = sum(len(r) for r in requests)
        cuts = sorted(rng.sample(range(1, total), rng.randrange(1, 12)))
        with connect(relay) as sock:
            check_order(send_in_pieces(sock, Reader(sock), requests, cuts), 200)


def test_a_pipelined_long_poll_outlives_the_idle_timer() -> None:
    """After a push's answer, a long-poll pipelined behind it is a request being
    answered, not an idle connection: it is not cut at the head timeout (1 s here)."""
    with RelayProcess(env={"HIVE_RELAY_KEEPALIVE_TIMEOUT": "1"}) as relay:
        (push,) = posts("framing-poll", 1, 100)
        poll = head("GET", "/v1/workspaces/framing-empty/envelopes?after=0&wait=3", {})
        with connect(relay) as sock:
            reader = Reader(sock)
            sock.sendall(push + poll)
            first = reader.answer()
            assert first is not None and first.status == 200, first
            answer = reader.answer()
            assert answer is not None, "the long-poll was cut off"
            assert (answer.status, json.loads(answer.body)) == (200, [])


# ------------------------------------------- the relay's own refusals, in order
def test_a_bad_request_after_pipelined_ones_is_answered_after_them(
    relays: dict[str, RelayProcess],
) -> None:
    """The 400 for unparsable bytes is the last answer, after those owed to the
    requests before it (a long-poll among them), never in their place."""
    relay = relays["default"]
    (push,) = posts("framing-order", 1, 100)
    poll = head("GET", "/v1/workspaces/framing-order-empty/envelopes?after=0&wait=1", {})
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(HEALTH + push + poll + b"NOT HTTP AT ALL\r\n\r\n" + HEALTH)
        got = [(a.status, a.body if a.status != 200 else b"") for a in reader.answers_until_eof()]
    assert [status for status, _ in got] == [200, 200, 200, 400], got
    assert json.loads(got[-1][1])["error"] == "bad_request"
    assert [b["i"] for b in stored(relay, "framing-order")] == [0]  # type: ignore[index]


def test_a_head_too_large_after_pipelined_ones_is_answered_after_them(
    relays: dict[str, RelayProcess],
) -> None:
    """A head that keeps growing is cut off at the limit, but only once the
    requests before it in the same stream have had their answers."""
    relay = relays["default"]
    requests = posts("framing-order-431", 5, 200)
    endless = b"GET /v1/health HTTP/1.1\r\nX-Pad: " + b"y" * 8192
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(b"".join(requests) + endless)
        try:
            for _ in range(4):
                sock.sendall(b"y" * 8192)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = reader.answers_until_eof()
    assert [a.status for a in got] == [200] * 5 + [431], [(a.status, a.body) for a in got]
    assert got[-1].error() == "headers_too_large" and got[-1].closes


def test_a_broken_chunked_body_is_its_requests_answer(relays: dict[str, RelayProcess]) -> None:
    """Bad chunk framing ends the request being read: one 400, then the close."""
    relay = relays["default"]
    ws = "framing-bad-chunk"
    request = head("POST", f"/v1/workspaces/{ws}/envelopes", {"Transfer-Encoding": "chunked"})
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(request + b'5\r\n"abc"\r\n')
        time.sleep(0.05)  # the relay is reading the body
        sock.sendall(b"zz\r\nnot a chunk\r\n0\r\n\r\n" + HEALTH)
        got = reader.answers_until_eof()
    assert [a.status for a in got] == [400], [(a.status, a.body) for a in got]
    assert got[0].error() == "bad_request" and got[0].closes
    assert stored(relay, ws) == []


# ------------------------------------------------------------ lingering close
def test_a_client_that_asked_to_close_may_finish_sending_its_body(
    relays: dict[str, RelayProcess],
) -> None:
    """`Connection: close` from the client and an early answer: the relay still
    drops the rest of the body before closing, so the client's writes succeed and
    it reads the answer and then the end, not a reset."""
    relay = relays["gated"]
    case = REFUSALS["401-short-rest"]
    head_bytes, body = refused_request(
        Refusal(**{**case.__dict__, "headers": (("Connection", "close"),)})
    )
    with connect(relay) as sock:
        reader = Reader(sock)
        sock.sendall(head_bytes + body[:1000])
        answer = reader.answer()
        assert answer is not None and answer.status == 401 and answer.closes, answer
        for at in range(1000, len(body), 8192):
            time.sleep(0.02)  # the relay has closed by now unless it lingers
            sock.sendall(body[at : at + 8192])
        assert reader.answers_until_eof() == []
        sock.settimeout(WAIT)
        assert sock.recv(1) == b""  # an orderly end (a reset would raise)


def test_sigterm_ends_a_lingering_connection() -> None:
    with RelayProcess() as relay:
        case = REFUSALS["413"]
        head_bytes, body = refused_request(case)
        with connect(relay) as sock:
            reader = Reader(sock)
            sock.sendall(head_bytes + body[:100_000])
            check_refusal(case, reader.answer())
            assert relay.stop(timeout=WAIT) == 0
            assert reader.answers_until_eof() == []


# ------------------------------------------------------------ pages as pieces
def test_a_page_sent_as_chunk_slices_is_framed_like_any_body(
    relays: dict[str, RelayProcess],
) -> None:
    # 1,500 rows of about 1 KiB span several sealed row chunks and the live rows
    # (relay.store.memory), so the page leaves as a vectored write of their
    # slices (relay.wire): its bytes, its Content-Length and the answer pipelined
    # after it must be what a joined body gives; a second read is a page cache hit.
    relay = relays["default"]
    ws = "pieces-" + str(random.randrange(1 << 30))
    pad = "p" * 1000
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for first in (0, 750):
            batch = [{"i": i, "p": pad} for i in range(first, first + 750)]
            r = c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=batch)
            assert r.status_code == 200, r.text
    target = f"/v1/workspaces/{ws}/envelopes?after=0"
    sock = connect(relay)
    sock.sendall(head("GET", target, {}) * 2 + head("GET", target + "&limit=3", {}))
    reader = Reader(sock)
    answers = [reader.answer() for _ in range(3)]
    sock.close()
    assert all(a is not None and a.status == 200 for a in answers)
    first, hit, small = answers  # type: ignore[misc]
    assert len(first.body) > 1_500_000 and first.body == hit.body
    assert [e["body"]["i"] for e in json.loads(first.body)] == list(range(1500))
    assert [e["body"]["i"] for e in json.loads(small.body)] == [0, 1, 2]
