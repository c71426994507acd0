"""Unit tests of the output accounting behind issue 18 §1, §2, §3, §5.

The process-level tests with clients that never read are in
tests/test_hostile_streams.py; these pin the rules those bounds rest on.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import parse_qsl

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

import relay.access
from relay.access import SignedTokenPolicy, b64url_encode
from relay.api.side import keyring_page
from relay.app import create_app
from relay.hub import Hub, Item, Subscriber
from relay.server import _ReadGate
from relay.settings import Settings


# ------------------------------------------------------------ §3 the hub
def items(*sizes: int, start: int = 1) -> list[Item]:
    return [Item(start + i, b"x" * n) for i, n in enumerate(sizes)]


def test_a_subscriber_overflows_past_its_byte_bound() -> None:
    sub = Subscriber("w", limit=1000, max_bytes=100)
    sub.push(items(60), 60)
    assert sub.queued_bytes == 60 and not sub.overflowed
    sub.push(items(30, start=2), 30)
    assert sub.queued_bytes == 90 and not sub.overflowed
    fired: list[bool] = []
    sub.on_overflow = lambda: fired.append(True)
    sub.push(items(20, start=3), 20)  # 110 > 100
    assert sub.overflowed and fired == [True]
    assert sub.items == [] and sub.queued_bytes == 0  # nothing is held once overflowed


def test_an_empty_queue_always_takes_the_next_append() -> None:
    sub = Subscriber("w", limit=1000, max_bytes=100)
    sub.push(items(500, 500), 1000)  # one batch larger than the bound
    assert not sub.overflowed and len(sub.items) == 2
    assert [it.seq for it in sub.take()] == [1, 2]
    assert sub.queued_bytes == 0
    sub.push(items(80, start=3), 80)
    assert not sub.overflowed and sub.queued_bytes == 80


def test_the_count_bound_still_holds_and_zero_bytes_means_no_byte_bound() -> None:
    sub = Subscriber("w", limit=3, max_bytes=0)
    sub.push(items(10**6, 10**6, 10**6), 3 * 10**6)
    assert not sub.overflowed
    sub.push(items(1, start=4), 1)
    assert sub.overflowed


def test_the_hub_sizes_each_append_once_for_every_subscriber() -> None:
    hub = Hub()
    with hub.subscribe("w", 1000, 100) as a, hub.subscribe("w", 1000, 10_000) as b:
        hub.on_append("w", [(1, b"y" * 70)])
        hub.on_append("w", [(2, b"y" * 70)])
        assert a.overflowed and a.queued_bytes == 0
        assert not b.overflowed and b.queued_bytes == 140


def test_an_overflow_while_replaying_only_asks_for_a_re_read() -> None:
    sub = Subscriber("w", limit=1000, max_bytes=10)
    sub.replaying = True
    fired: list[bool] = []
    sub.on_overflow = lambda: fired.append(True)
    sub.push(items(8), 8)
    sub.push(items(8, start=2), 8)
    assert sub.overflowed and fired == []


# --------------------------------------------------- §1 the read gate
class FakeTransport:
    def __init__(self) -> None:
        self.reading = True
        self.buffered = 0
        self.closed = False
        self.aborted = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        assert not self.reading, "resumed twice"
        self.reading = True
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def test_reading_stays_paused_while_either_reason_holds() -> None:
    t = FakeTransport()
    gate = _ReadGate(t, grace=1.0)  # type: ignore[arg-type]
    gate.pause_reading()  # the app has a message it has not taken
    gate.write_blocked = True  # and output is above the high-water mark
    gate.sync()
    gate.resume_reading()  # the app took it: output is still blocked
    assert not t.reading
    gate.write_blocked = False
    gate.sync()
    assert t.reading
    gate.write_blocked = True
    gate.sync()
    gate.pause_reading()
    gate.write_blocked = False
    gate.sync()  # the app is still behind
    assert not t.reading
    assert t.calls == ["pause", "resume", "pause"]
    assert gate.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest passes through


def test_closing_with_output_the_peer_never_takes_aborts_after_the_grace() -> None:
    async def run() -> tuple[bool, bool, bool]:
        stuck, drained = FakeTransport(), FakeTransport()
        stuck.buffered = 1 << 20
        _ReadGate(stuck, grace=0.05).close()  # type: ignore[arg-type]
        _ReadGate(drained, grace=0.05).close()  # type: ignore[arg-type]
        lost = FakeTransport()
        lost.buffered = 10
        gate = _ReadGate(lost, grace=0.05)  # type: ignore[arg-type]
        gate.close()
        gate.lost()  # the connection ended by itself: nothing to abort
        assert not stuck.aborted
        await asyncio.sleep(0.2)
        return stuck.aborted, drained.aborted, lost.aborted

    stuck, drained, lost = asyncio.run(run())
    assert stuck and not drained and not lost


# ------------------------------------------------- §2 side-channel pages
def test_keyring_page_walks_back_from_the_newest() -> None:
    blobs = [b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10]
    assert keyring_page(blobs, 4, 1000) == 0  # all fit
    assert keyring_page(blobs, 4, 22) == 2  # "c","d" and their commas
    assert keyring_page(blobs, 2, 22) == 0
    assert keyring_page(blobs, 4, 1) == 3  # always at least one blob
    assert keyring_page(blobs, 0, 1000) == 0  # nothing before the first


def side_client(**settings: Any) -> TestClient:
    settings.setdefault("push_rate", 0)
    return TestClient(create_app(Settings(**settings)))


def test_a_paged_keyring_reads_back_whole_newest_first() -> None:
    with side_client(max_page_bytes=100) as c:
        sent = [json.dumps({"version": i, "pad": "p" * 20}).encode() for i in range(12)]
        for blob in sent:
            assert c.post("/v1/workspaces/k/keyring", content=blob).status_code == 200
        pages: list[list[Any]] = []
        query: dict[str, str] = {}
        while True:
            r = c.get("/v1/workspaces/k/keyring", params=query)
            assert r.status_code == 200
            assert len(r.content) <= 100
            pages.append(r.json())
            if "x-relay-more" not in r.headers:
                assert "x-relay-next" not in r.headers
                break
            assert r.headers["x-relay-more"] == "true"
            query = dict(parse_qsl(r.headers["x-relay-next"]))
            assert set(query) == {"before"}
        assert len(pages) > 1
        assert pages[0][-1]["version"] == 11  # a device that never pages sees the newest key
        joined = [blob for page in reversed(pages) for blob in page]
        assert [b["version"] for b in joined] == list(range(12))


def test_a_browser_app_can_read_the_paging_headers() -> None:
    with side_client(max_page_bytes=20, cors_origins="https://app.example") as c:
        for i in range(3):
            c.post("/v1/workspaces/b/keyring", content=b'{"version":%d}' % i)
        r = c.get("/v1/workspaces/b/keyring", headers={"Origin": "https://app.example"})
        assert r.headers["x-relay-next"] == "before=2"
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "x-relay-more" in exposed and "x-relay-next" in exposed


def test_a_small_keyring_is_one_answer_without_paging_headers() -> None:
    with side_client() as c:
        c.post("/v1/workspaces/s/keyring", content=b'{"version":1}')
        r = c.get("/v1/workspaces/s/keyring")
        assert r.content == b'[{"version":1}]'
        assert "x-relay-more" not in r.headers and "x-relay-next" not in r.headers
        r = c.get("/v1/workspaces/s/keyring", params={"before": "0"})
        assert r.json() == [] and "x-relay-more" not in r.headers


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "99999999999999999999999"])
def test_a_bad_before_is_400(value: str) -> None:
    with side_client() as c:
        r = c.get("/v1/workspaces/s/keyring", params={"before": value})
        assert r.status_code == 400 and r.json()["error"] == "invalid_before"


@pytest.mark.parametrize("channel", ["presence", "candidates"])
def test_a_paged_device_map_reads_back_whole(channel: str) -> None:
    with side_client(max_page_bytes=120) as c:
        devices = {f"dev-{i:02d}/ü&x": {"n": i, "pad": "q" * 10} for i in range(15)}
        for device, data in devices.items():
            r = c.post(f"/v1/workspaces/p/{channel}", json={"device_id": device, "data": data})
            assert r.status_code == 200
        seen: dict[str, Any] = {}
        query: dict[str, str] = {}
        pages = 0
        while True:
            r = c.get(f"/v1/workspaces/p/{channel}", params=query)
            assert r.status_code == 200 and len(r.content) <= 120
            page = r.json()
            assert not set(page) & set(seen)  # no entry twice
            seen.update(page)
            pages += 1
            if "x-relay-more" not in r.headers:
                break
            query = dict(parse_qsl(r.headers["x-relay-next"]))
            assert set(query) == {"after"}
        assert pages > 1
        assert seen == devices


def test_a_bad_after_is_400() -> None:
    with side_client() as c:
        for value in ("", "d" * 201):
            r = c.get("/v1/workspaces/p/presence", params={"after": value})
            assert r.status_code == 400 and r.json()["error"] == "invalid_after"


# --------------------------------------------------------- §5 exp and nbf
def sign(key: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    body = b64url_encode(json.dumps(claims).encode())
    return f"hrt1.{body}.{b64url_encode(key.sign(f'hrt1.{body}'.encode()))}"


def test_a_grant_carries_the_tokens_exp() -> None:
    key = Ed25519PrivateKey.generate()
    policy = SignedTokenPolicy([key.public_key()])
    exp = int(time.time()) + 60
    assert policy.authenticate(sign(key, {"sub": "s", "exp": exp})).expires == exp
    assert policy.authenticate(sign(key, {"sub": "s"})).expires == 0
    assert relay.access.OPEN_GRANT.expires == 0


def test_nbf_is_checked_on_every_use(monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    policy = SignedTokenPolicy([key.public_key()])
    now = time.time()
    token = sign(key, {"sub": "s", "nbf": int(now) + 100})
    with pytest.raises(relay.access.Denied) as info:
        policy.authenticate(token)
    assert info.value.status == 401 and "not valid yet" in info.value.message
    # The verified token is cached; the clock still decides.
    monkeypatch.setattr(relay.access.time, "time", lambda: now + 101)
    assert policy.authenticate(token).subject == "s"


@pytest.mark.parametrize("nbf", ["soon", -1, 1.5, True])
def test_an_unusable_nbf_is_401(nbf: Any) -> None:
    key = Ed25519PrivateKey.generate()
    policy = SignedTokenPolicy([key.public_key()])
    with pytest.raises(relay.access.Denied) as info:
        policy.authenticate(sign(key, {"sub": "s", "nbf": nbf}))
    assert "nbf" in info.value.message


# --------------------------------------------- §1 the WebSocket reply queue
class UnreadSocket:
    """A WebSocket whose client sends `frames` and never reads a reply."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.received = 0

    async def receive(self) -> dict[str, Any]:
        if self.received < len(self.frames):
            self.received += 1
            return {"type": "websocket.receive", "text": self.frames[self.received - 1]}
        await asyncio.Event().wait()  # the client sends nothing more
        raise AssertionError("unreachable")


def test_the_reply_queue_stops_the_reader_until_the_writer_drains_it() -> None:
    from relay.api.live import OUTBOX_BYTES, WsSession
    from relay.app import build_relay

    async def run() -> None:
        relay_ = build_relay(Settings(push_rate=0))
        sock = UnreadSocket(["not json"] * 5000)
        session = WsSession(relay_, sock, "w", "c")  # type: ignore[arg-type]
        sub = Subscriber("w", 1000)
        reader = asyncio.get_running_loop().create_task(session._reader(sub, lambda: None))
        for _ in range(50):
            await asyncio.sleep(0)
        held = sock.received
        assert 0 < held < 5000  # it stopped taking frames...
        assert OUTBOX_BYTES < session.outbox_bytes <= OUTBOX_BYTES + 200  # ...past the bound
        assert session.outbox_bytes == sum(len(f) for f in session.outbox)
        for _ in range(50):
            await asyncio.sleep(0)
        assert sock.received == held  # and stays stopped while nothing drains
        sent: list[str] = []

        async def send_text(text: str) -> None:
            sent.append(text)

        await session._flush_outbox(send_text)  # the writer drains it
        assert session.outbox_bytes == 0 and len(sent) == held
        for _ in range(50):
            await asyncio.sleep(0)
        assert sock.received > held  # the reader took frames again
        reader.cancel()

    asyncio.run(run())
