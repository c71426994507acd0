"""A live stream whose peer is already gone when the relay ends it (at shutdown, or
because the subscriber fell behind) ends quietly: no traceback, no error line, the
slot released, a graceful exit 0.

The clients are raw sockets with a small receive buffer that stop reading, so the
relay's writes back up and its last send or close is still waiting when the peer
resets the connection (SO_LINGER 0: an RST, no FIN, no close hand-shake). That
ordering, not luck, is what makes the final send meet a departed peer.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import os
import re
import signal
import socket
import struct
import time

import httpx
import pytest

from relay.logs import STREAM_ABANDONED, _DropPathLines
from tests.relayproc import RelayProcess, assert_quiet_log

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

WAIT = 30.0
# One envelope body larger than the kernel's largest send buffer (4 MiB by default)
# plus the relay's own write buffer: once the relay has written it, its transport
# is paused, and its next send or close waits until the peer reads (or leaves).
BIG = "x" * 10_000_000
ENV = {"HIVE_RELAY_PUSH_RATE": "0", "HIVE_RELAY_MAX_BODY_BYTES": str(16 * 1024 * 1024)}


def _small_buffer_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    s.settimeout(WAIT)
    s.connect(("127.0.0.1", port))
    return s


def _read_head(s: socket.socket) -> bytes:
    """The answer's head, byte by byte so that nothing past it is consumed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = s.recv(1)
        assert chunk, f"the relay closed the connection; head so far {head!r}"
        head += chunk
    return head


def _masked_text(payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


def _ws_subscriber(port: int, ws: str) -> socket.socket:
    s = _small_buffer_socket(port)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /v1/workspaces/{ws}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert _read_head(s).startswith(b"HTTP/1.1 101 ")
    s.sendall(_masked_text(b'{"op":"sub","after":0}'))
    return s


def _sse_subscriber(port: int, ws: str) -> socket.socket:
    s = _small_buffer_socket(port)
    s.sendall(
        f"GET /v1/workspaces/{ws}/events?bodies=1&after=0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n\r\n".encode()
    )
    assert _read_head(s).startswith(b"HTTP/1.1 200 ")
    return s


def _reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _until_received(s: socket.socket, marker: bytes) -> None:
    """Read until `marker` arrives: the stream is live (its replay is over)."""
    seen = b""
    while marker not in seen:
        chunk = s.recv(65536)
        assert chunk, "the stream ended early"
        seen = seen[-len(marker) :] + chunk


def _back_up(c: httpx.Client, ws: str, n: int = 1) -> None:
    """`n` big envelopes: with one, the relay has sent it all and its stream waits
    for the next event with its transport paused; with more, it is stuck mid-send."""
    for i in range(n):
        r = c.post(f"/v1/workspaces/{ws}/envelopes", json={"i": i, "pad": BIG})
        assert r.status_code == 200, r.text


def _post_marker(c: httpx.Client, ws: str, n: int) -> None:
    r = c.post(f"/v1/workspaces/{ws}/envelopes", content=b'{"live":%d}' % n)
    assert r.status_code == 200, r.text


def _metric(c: httpx.Client, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", c.get("/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def _wait_for_log(relay: RelayProcess, text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in relay.logs():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{relay.logs()}"
        time.sleep(0.02)


def _open(kind: str, port: int, ws: str) -> socket.socket:
    return _ws_subscriber(port, ws) if kind == "ws" else _sse_subscriber(port, ws)


def _shutdown_meets_a_departed_peer(kind: str) -> None:
    with RelayProcess(env=ENV) as relay, httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        subs = [_open(kind, relay.port, f"gone-{kind}-{n}") for n in range(3)]
        for n, s in enumerate(subs):
            _post_marker(c, f"gone-{kind}-{n}", n)
            _until_received(s, b'"live":%d' % n)
            _back_up(c, f"gone-{kind}-{n}", 1 + n % 2)
        relay.send_signal(signal.SIGTERM)
        _wait_for_log(relay, "SIGTERM: shutting down")
        # The relay is ending its streams (its last sends wait up to a second for a
        # paused transport): the peers leave now.
        time.sleep(0.2)
        for s in subs:
            _reset(s)
        assert relay.stop() == 0
    assert_quiet_log(relay.logs())


def test_shutdown_with_websocket_peers_gone_mid_close_is_quiet() -> None:
    _shutdown_meets_a_departed_peer("ws")


def test_shutdown_with_sse_peers_gone_mid_send_is_quiet() -> None:
    _shutdown_meets_a_departed_peer("sse")


def _slow_consumer_gone(kind: str) -> None:
    """The subscriber falls behind (the relay ends its stream) and resets at once."""
    with (
        RelayProcess(env={**ENV, "HIVE_RELAY_STREAM_BUFFER": "4"}) as relay,
        httpx.Client(base_url=relay.url, timeout=WAIT) as c,
    ):
        for n in range(3):
            ws = f"slow-{kind}-{n}"
            s = _open(kind, relay.port, ws)
            _post_marker(c, ws, n)
            _until_received(s, b'"live":%d' % n)
            _back_up(c, ws)
            # Acknowledged means the hub has handed it to the subscriber: past the bound.
            r = c.post(f"/v1/workspaces/{ws}/envelopes/batch", json=[{"j": j} for j in range(8)])
            assert r.status_code == 200, r.text
            _reset(s)
        deadline = time.monotonic() + WAIT
        while _metric(c, "hive_relay_live_streams") != 0:
            assert time.monotonic() < deadline, "a departed subscriber kept its stream slot"
            time.sleep(0.05)
        assert _metric(c, "hive_relay_slow_consumers_disconnected_total") == 3
        assert relay.stop() == 0
    assert_quiet_log(relay.logs())


def test_slow_websocket_consumer_gone_before_its_close_is_quiet() -> None:
    _slow_consumer_gone("ws")


def test_slow_sse_consumer_gone_before_its_last_chunk_is_quiet() -> None:
    _slow_consumer_gone("sse")


def test_shutdown_with_long_pollers_gone_is_quiet() -> None:
    """Long-polls whose clients reset, one before the shutdown and the rest during it:
    their answers go nowhere, quietly, and the relay still exits 0."""
    with RelayProcess(env=ENV) as relay, httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        polls = []
        for n in range(3):
            s = _small_buffer_socket(relay.port)
            s.sendall(
                f"GET /v1/workspaces/poll-{n}/envelopes?after=0&wait=30 HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{relay.port}\r\n\r\n".encode()
            )
            polls.append(s)
        deadline = time.monotonic() + WAIT
        while _metric(c, "hive_relay_live_streams") != 3:
            assert time.monotonic() < deadline, "the long-polls never started waiting"
            time.sleep(0.05)
        _reset(polls[0])
        relay.send_signal(signal.SIGTERM)
        _wait_for_log(relay, "SIGTERM: shutting down")
        for s in polls[1:]:
            _reset(s)
        assert relay.stop() == 0
    assert_quiet_log(relay.logs())


def test_slow_sse_consumer_that_stopped_reading_is_let_go_quietly() -> None:
    """Fallen behind and not reading at all (a phone that lost its network sends no
    reset): its last chunk cannot be delivered. The relay waits a second for it, ends
    the stream, frees the slot, and logs no error (it said 'disconnected a slow SSE
    subscriber' at info)."""
    with (
        RelayProcess(env={**ENV, "HIVE_RELAY_STREAM_BUFFER": "4"}) as relay,
        httpx.Client(base_url=relay.url, timeout=WAIT) as c,
    ):
        s = _open("sse", relay.port, "stalled")
        _post_marker(c, "stalled", 0)
        _until_received(s, b'"live":0')
        _back_up(c, "stalled")
        r = c.post("/v1/workspaces/stalled/envelopes/batch", json=[{"j": j} for j in range(8)])
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + WAIT
        while _metric(c, "hive_relay_live_streams") != 0:
            assert time.monotonic() < deadline, "a stalled subscriber kept its stream slot"
            time.sleep(0.05)
        assert _metric(c, "hive_relay_slow_consumers_disconnected_total") == 1
        log = relay.logs()
        _reset(s)
        assert relay.stop() == 0
    assert "disconnected a slow SSE subscriber" in log
    assert_quiet_log(relay.logs())


def test_shutdown_with_a_peer_that_stopped_reading_ends_its_stream_without_a_traceback() -> None:
    """At shutdown an SSE stream's last chunk, or a WebSocket's close frame, waits at
    most a second for a peer that no longer reads. The connection itself stays until
    HIVE_RELAY_SHUTDOWN_TIMEOUT (its unsent bytes are uvicorn's to drop), so uvicorn's
    own line about that timeout is the one ERROR expected here."""
    env = {**ENV, "HIVE_RELAY_SHUTDOWN_TIMEOUT": "5"}
    with RelayProcess(env=env) as relay, httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        subs = []
        for kind in ("sse", "ws"):
            s = _open(kind, relay.port, f"stall-{kind}")
            _post_marker(c, f"stall-{kind}", 0)
            _until_received(s, b'"live":0')
            _back_up(c, f"stall-{kind}")
            subs.append(s)
        assert relay.stop() == 0
        for s in subs:
            _reset(s)
    log = relay.logs()
    timeout_line = "ERROR uvicorn.error Cancel 0 running task(s), timeout graceful shutdown"
    assert_quiet_log("\n".join(line for line in log.splitlines() if timeout_line not in line))


def test_only_an_abandoned_stream_hides_uvicorns_incomplete_answer_line() -> None:
    """Any other answer left incomplete is a relay bug, and stays an ERROR line."""
    msg = "ASGI callable returned without completing response."
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, None, None)
    keep = _DropPathLines()
    assert keep.filter(record)

    def abandoned() -> bool:
        STREAM_ABANDONED.set(True)
        return keep.filter(record)

    assert contextvars.copy_context().run(abandoned) is False
    assert keep.filter(record)  # the flag belonged to that one context
