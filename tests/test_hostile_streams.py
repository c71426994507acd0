"""Hostile clients that send and never read (issue 18 §1, §2, §3, §5), on real relays.

Each test starts a fresh `python -m relay`, makes it produce output for a
client that takes none of it, and measures what the relay holds: its resident
memory (VmRSS) while the client is still connected, or its own accounting.
The bounds are generous (tens of MiB) but far below what the unbounded relay
held for the same traffic (hundreds of MiB), so a regression fails loudly and
a busy machine does not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.access import b64url_encode
from tests.relayproc import RelayProcess

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
WAIT = 20.0


# ------------------------------------------------------------------ measures
def rss(relay: RelayProcess) -> int:
    """The relay process's resident memory in bytes."""
    assert relay.proc is not None
    text = open(f"/proc/{relay.proc.pid}/status").read()  # noqa: SIM115
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    assert m, text
    return int(m.group(1)) * 1024


def metric(relay: RelayProcess, name: str) -> float:
    text = httpx.get(relay.url + "/metrics", timeout=WAIT).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, (name, text[:2000])
    return float(m.group(1))


def assert_healthy(relay: RelayProcess) -> None:
    r = httpx.get(relay.url + "/v1/health", timeout=WAIT)
    assert r.status_code == 200, r.text


def small_socket(relay: RelayProcess) -> socket.socket:
    """A loopback connection with a small receive buffer, so the kernel holds little."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", relay.port))
    return sock


def send_until_blocked(sock: socket.socket, chunk: bytes, limit: int, stall: float = 3.0) -> int:
    """Send `chunk` repeatedly until `limit` bytes went out, the peer stops taking
    them for `stall` seconds, or it closes. Returns the bytes sent."""
    sent = 0
    sock.settimeout(stall)
    view = memoryview(chunk)
    while sent < limit:
        try:
            n = sock.send(view)
        except (TimeoutError, ConnectionError, OSError):
            break
        sent += n
        view = view[n:] if n < len(view) else memoryview(chunk)
    return sent


# --------------------------------------------------------- raw WebSocket
def ws_open(relay: RelayProcess, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A raw WebSocket: the hand-shake by hand, then nothing is ever read again."""
    sock = small_socket(relay)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{relay.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (FIN set)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


@pytest.fixture
def open_relay() -> Iterator[RelayProcess]:
    with RelayProcess() as relay:  # default settings: what users run
        yield relay


# ------------------------------------------------------------ §1 WebSocket
def test_ws_tiny_invalid_frames_never_read_are_bounded() -> None:
    # Push rate off, so only the output bound stands between the flood and memory
    # (issue 18: 17 MiB of 1-byte frames grew the relay by 372 MiB).
    with RelayProcess(env={"HIVE_RELAY_PUSH_RATE": "0"}) as relay:
        sock = ws_open(relay, "/v1/workspaces/flood/ws")
        before = rss(relay)
        burst = ws_frame(b"x") * 4096
        sent = send_until_blocked(sock, burst, 6 * MIB)
        time.sleep(1.0)
        grown = rss(relay) - before
        assert sent > 64 * 1024, sent  # the relay did read a good part of it
        assert grown < 48 * MIB, (grown / MIB, sent / MIB)
        assert_healthy(relay)
        sock.close()


def test_ws_invalid_frames_past_the_rate_close_the_socket(open_relay: RelayProcess) -> None:
    relay = open_relay

    async def flood() -> tuple[int | None, str, list[str]]:
        async with websockets.connect(f"ws://127.0.0.1:{relay.port}/v1/workspaces/w/ws") as sock:
            for _ in range(400):  # the default burst is 300
                await sock.send("not json")
            replies: list[str] = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    replies.append(str(await asyncio.wait_for(sock.recv(), WAIT)))
            assert sock.close_code is not None
            return sock.close_code, sock.close_reason or "", replies

    code, reason, replies = asyncio.run(flood())
    assert code == 1008, (code, reason)
    assert "invalid frames" in reason
    # The frames within the burst were answered; the first one past it closed the socket.
    assert 250 <= len(replies) <= 340, len(replies)
    assert all(json.loads(r)["error"] == "invalid_frame" for r in replies)
    assert_healthy(relay)


def test_ws_large_refs_are_refused_not_echoed(open_relay: RelayProcess) -> None:
    relay = open_relay
    frame = ws_frame(json.dumps({"op": "pub", "ref": "r" * 60_000}).encode())
    sock = ws_open(relay, "/v1/workspaces/refs/ws")
    before = rss(relay)
    sent = send_until_blocked(sock, frame * 16, 256 * MIB)
    time.sleep(1.0)
    grown = rss(relay) - before
    # Either the rate closed the socket or output blocked: the relay holds little.
    assert grown < 48 * MIB, (grown / MIB, sent / MIB)
    assert_healthy(relay)
    sock.close()

    async def one() -> dict[str, object]:
        async with websockets.connect(f"ws://127.0.0.1:{relay.port}/v1/workspaces/r/ws") as ws:
            await ws.send(json.dumps({"op": "pub", "ref": "r" * 300, "body": {"a": 1}}))
            answer: dict[str, object] = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            return answer

    answer = asyncio.run(one())
    assert answer["error"] == "invalid_ref", answer
    assert "ref" not in answer
    assert httpx.get(relay.url + "/v1/workspaces/r/envelopes").json() == []


def test_ws_ping_flood_never_read_is_bounded(open_relay: RelayProcess) -> None:
    # Issue 18: unread pongs to a ping flood buffered 175 MiB.
    relay = open_relay
    sock = ws_open(relay, "/v1/workspaces/pings/ws")
    before = rss(relay)
    pings = ws_frame(b"p" * 125, opcode=0x9) * 512
    sent = send_until_blocked(sock, pings, 96 * MIB)
    time.sleep(1.0)
    grown = rss(relay) - before
    assert grown < 32 * MIB, (grown / MIB, sent / MIB)
    assert sent < 64 * MIB, sent / MIB  # the relay stopped reading: the flood blocked
    assert_healthy(relay)
    sock.close()


def test_a_websocket_peer_that_never_reads_again_is_let_go(open_relay: RelayProcess) -> None:
    # The socket stays open and unread: uvicorn's keepalive (ping every 20 s, 20 s
    # to answer) closes it, and a close whose output the peer never takes is
    # aborted, freeing its slot and buffers (before: held for ever).
    relay = open_relay
    sock = ws_open(relay, "/v1/workspaces/stuck/ws")
    send_until_blocked(sock, ws_frame(b"p" * 125, opcode=0x9) * 512, 96 * MIB)
    assert metric(relay, "hive_relay_live_streams") == 1
    deadline = time.monotonic() + 90
    while metric(relay, "hive_relay_live_streams") > 0 and time.monotonic() < deadline:
        time.sleep(1.0)
    assert metric(relay, "hive_relay_live_streams") == 0
    assert_healthy(relay)
    sock.close()


def test_ws_pubs_whose_acks_are_never_read_do_not_pile_up() -> None:
    with RelayProcess(env={"HIVE_RELAY_PUSH_RATE": "0"}) as relay:
        sock = ws_open(relay, "/v1/workspaces/acks/ws")
        before = rss(relay)
        pub = ws_frame(json.dumps({"op": "pub", "body": {"n": 1}, "ref": "q" * 200}).encode())
        sent = send_until_blocked(sock, pub * 256, 64 * MIB)
        time.sleep(1.0)
        grown = rss(relay) - before
        assert grown < 48 * MIB, (grown / MIB, sent / MIB)
        assert_healthy(relay)
        sock.close()


# ------------------------------------------------------- §2 side channels
def _fill_keyring(relay: RelayProcess, ws: str, blobs: int, size: int) -> None:
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for i in range(blobs):
            blob = json.dumps({"version": i, "pad": "k" * (size - 40)}).encode()
            assert c.post(f"/v1/workspaces/{ws}/keyring", content=blob).status_code == 200


def test_unread_keyring_gets_pin_at_most_a_page_each() -> None:
    # Issue 18: 12 unread GETs of a 50 MiB keyring held +637 MiB.
    env = {"HIVE_RELAY_MAX_PAGE_BYTES": str(1 * MIB), "HIVE_RELAY_PUSH_RATE": "0"}
    with RelayProcess(env=env) as relay:
        _fill_keyring(relay, "big", 100, 250_000)  # ~24 MiB
        before = rss(relay)
        socks = []
        for _ in range(12):
            s = small_socket(relay)
            s.sendall(b"GET /v1/workspaces/big/keyring HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        time.sleep(2.0)
        grown = rss(relay) - before
        assert grown < 64 * MIB, grown / MIB  # unbounded: ~12 x 24 MiB
        assert_healthy(relay)
        for s in socks:
            s.close()
        first = httpx.get(relay.url + "/v1/workspaces/big/keyring", timeout=WAIT)
        assert first.headers["x-relay-more"] == "true"
        assert len(first.content) <= 1 * MIB
        assert first.json()[-1]["version"] == 99  # the newest blob leads


def test_pipelined_gets_never_read_pin_one_answer() -> None:
    # uvicorn answers one request of a connection at a time and waits for the
    # write buffer to drain before it reads the next: measured, not assumed.
    env = {"HIVE_RELAY_MAX_PAGE_BYTES": str(1 * MIB), "HIVE_RELAY_PUSH_RATE": "0"}
    with RelayProcess(env=env) as relay:
        _fill_keyring(relay, "pipe", 8, 250_000)
        before = rss(relay)
        sock = small_socket(relay)
        get = b"GET /v1/workspaces/pipe/keyring HTTP/1.1\r\nHost: x\r\n\r\n"
        sent = send_until_blocked(sock, get * 200, 200 * len(get) * 20)
        time.sleep(2.0)
        grown = rss(relay) - before
        assert sent >= 200 * len(get), sent  # every request was sent...
        assert grown < 32 * MIB, grown / MIB  # ...but ~4,000 MiB of answers are not held
        assert_healthy(relay)
        sock.close()


# ---------------------------------------------------------- §3 slow SSE
def test_slow_sse_subscriber_is_bounded_in_bytes() -> None:
    # Issue 18: one stream held +301 MiB while the store held 15 envelopes.
    env = {"HIVE_RELAY_MAX_ENVELOPES": "15", "HIVE_RELAY_PUSH_RATE": "0"}
    with RelayProcess(env=env) as relay:
        sock = small_socket(relay)
        sock.sendall(b"GET /v1/workspaces/slow/events?bodies=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1)  # the answer has begun; nothing more is read
        time.sleep(0.5)
        before = rss(relay)
        pad = "e" * (MIB - 40)
        with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
            for i in range(200):  # distinct bodies: identical ones are deduplicated
                body = json.dumps({"n": i, "pad": pad}).encode()
                assert c.post("/v1/workspaces/slow/envelopes", content=body).status_code == 200
        time.sleep(1.0)
        grown = rss(relay) - before
        assert grown < 96 * MIB, grown / MIB  # unbounded: ~200 MiB queued for one stream
        assert metric(relay, "hive_relay_slow_consumers_disconnected_total") >= 1
        assert_healthy(relay)
        sock.close()


# ------------------------------------------------------- §5 token lifetime
def _signed_relay() -> tuple[RelayProcess, bytes]:
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    relay = RelayProcess(env={"HIVE_RELAY_TOKEN_PUBKEY": public, "HIVE_RELAY_KEEPALIVE_SECS": "1"})
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return relay, raw


def _token(private: bytes, **claims: object) -> str:
    body = b64url_encode(json.dumps({"sub": "t", **claims}).encode())
    signing = f"hrt1.{body}"
    sig = Ed25519PrivateKey.from_private_bytes(private).sign(signing.encode())
    return f"{signing}.{b64url_encode(sig)}"


def test_streams_end_when_the_token_expires() -> None:
    relay, private = _signed_relay()
    with relay:
        token = _token(private, exp=int(time.time()) + 4)
        auth = {"authorization": f"Bearer {token}"}

        async def ws_stream() -> tuple[int | None, str, float]:
            url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/x/ws"
            async with websockets.connect(url, additional_headers=auth) as sock:
                await sock.send(json.dumps({"op": "sub", "after": 0}))
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await asyncio.wait_for(sock.recv(), WAIT)
                return sock.close_code, sock.close_reason or "", time.time()

        async def sse_stream() -> tuple[str, float]:
            async with (
                httpx.AsyncClient(timeout=WAIT) as c,
                c.stream("GET", relay.url + "/v1/workspaces/x/events", headers=auth) as r,
            ):
                assert r.status_code == 200
                text = ""
                async for chunk in r.aiter_text():
                    text += chunk
                return text, time.time()

        async def both() -> tuple[tuple[int | None, str, float], tuple[str, float]]:
            return await asyncio.gather(ws_stream(), sse_stream())

        (code, reason, ws_end), (text, sse_end) = asyncio.run(both())
        assert code == 1008, (code, reason)
        assert reason == "token expired"
        assert "event: expired\n" in text, text
        assert '"error":"token_expired"' in text
        assert text.endswith("\n\n")
        deadline = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["exp"]
        for end in (ws_end, sse_end):
            assert deadline - 1 <= end <= deadline + 10, (end, deadline)
        # And the expired token no longer opens anything.
        r = httpx.get(relay.url + "/v1/workspaces/x/events", headers=auth, timeout=WAIT)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"


def test_a_token_whose_nbf_is_in_the_future_is_refused() -> None:
    relay, private = _signed_relay()
    with relay:
        early = {"authorization": "Bearer " + _token(private, nbf=int(time.time()) + 3600)}
        for method, path in (
            ("GET", "/v1/workspaces/x/envelopes"),
            ("POST", "/v1/workspaces/x/envelopes"),
            ("GET", "/v1/workspaces/x/events"),
        ):
            r = httpx.request(method, relay.url + path, headers=early, content=b"{}", timeout=WAIT)
            assert r.status_code == 401, (path, r.status_code, r.text)
            assert r.json()["error"] == "unauthorized"
            assert "not valid yet" in r.json()["message"]

        async def ws() -> int:
            url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/x/ws"
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(url, additional_headers=early):
                    pass
            return info.value.response.status_code

        assert asyncio.run(ws()) == 401
        ready = {"authorization": "Bearer " + _token(private, nbf=int(time.time()) - 5)}
        r = httpx.get(relay.url + "/v1/workspaces/x/envelopes", headers=ready, timeout=WAIT)
        assert r.status_code == 200, r.text
