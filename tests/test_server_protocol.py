"""relay/server.py's transport wrapper: an answer's head and body leave in one send.

The wrapper sits between one uvicorn response cycle and the real transport.
These tests drive it on a running event loop with a transport that records
what it is asked to send; tests/test_hostile.py and the live-delivery tests
cover the same code through real relay processes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from relay.server import _HeadWithBody
from tests.relayproc import RelayProcess

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"


class Recording:
    """Stands in for the socket transport: records each send as one item."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.sends.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        assert not self.closed
        self.sends.append(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


async def turn() -> None:
    """Let the event loop run what was scheduled with call_soon."""
    await asyncio.sleep(0)


@pytest.mark.anyio
async def test_a_small_answer_leaves_in_one_send() -> None:
    real = Recording()
    t = _HeadWithBody(real)  # type: ignore[arg-type]
    t.write(HEAD)
    assert real.sends == []  # held for the body
    t.write(b'{"seq":1}')
    assert real.sends == [HEAD + b'{"seq":1}']
    await turn()
    assert real.sends == [HEAD + b'{"seq":1}']  # nothing left to flush


@pytest.mark.anyio
async def test_a_head_without_a_body_yet_leaves_on_the_next_turn() -> None:
    """A stream that has nothing to send yet must still get its head out."""
    real = Recording()
    t = _HeadWithBody(real)  # type: ignore[arg-type]
    t.write(HEAD)
    await turn()
    assert real.sends == [HEAD]
    t.write(b": connected\n\n")
    t.write(b"data: 1\n\n")
    assert real.sends == [HEAD, b": connected\n\n", b"data: 1\n\n"]


@pytest.mark.anyio
async def test_close_sends_a_held_head_first_and_other_calls_pass_through() -> None:
    real = Recording()
    t = _HeadWithBody(real)  # type: ignore[arg-type]
    t.write(HEAD)
    t.close()
    assert real.sends == [HEAD] and real.closed
    assert t.get_extra_info("peername") == "extra:peername"
    await turn()
    assert real.sends == [HEAD]  # the scheduled flush finds nothing


@pytest.mark.anyio
async def test_a_head_held_when_the_peer_is_gone_is_dropped() -> None:
    real = Recording()
    t = _HeadWithBody(real)  # type: ignore[arg-type]
    t.write(HEAD)
    real.closed = True  # the connection was lost before the loop turned
    await turn()
    assert real.sends == []


@pytest.fixture(scope="module")
def relay() -> Any:
    with RelayProcess() as proc:
        yield proc


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/health"),
        ("HEAD", "/v1/health"),
        ("POST", "/v1/workspaces/p/envelopes"),
        ("GET", "/v1/workspaces/p/envelopes?after=0"),
        ("GET", "/v1/nowhere"),
    ],
)
def test_answers_through_a_real_relay_are_whole(
    relay: RelayProcess, method: str, path: str
) -> None:
    """Through a real relay (uvloop, httptools): heads and bodies arrive whole and
    in order on one keep-alive connection, answers with and without a body alike."""
    with httpx.Client(base_url=relay.url, timeout=10) as c:
        for i in range(3):
            body = b'{"n":%d}' % i if method == "POST" else None
            r = c.request(method, path, content=body)
            assert r.status_code in (200, 404)
            assert r.headers["x-content-type-options"] == "nosniff"
            if method == "HEAD":
                assert r.content == b""
            else:
                assert len(r.content) == int(r.headers["content-length"])
