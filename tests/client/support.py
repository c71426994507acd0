"""Helpers for the client SDK tests: a fault-injecting TCP proxy, a relay that lacks
features, signed tokens, and bounded waits for events."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from client import Backoff, Event, Workspace, WorkspaceEvent

#: Small delays so reconnects and key retries happen quickly in tests.
FAST: dict[str, Any] = {
    "reconnect": Backoff(initial=0.02, maximum=0.3),
    "key_retry": Backoff(initial=0.02, maximum=0.2),
    "poll_interval": 0.05,
    "long_poll_wait": 10.0,
}

#: Every bounded wait in these tests: long enough never to flake, short enough to fail fast.
WAIT = 10.0


def new_workspace_id() -> str:
    return f"sdk-{uuid.uuid4().hex[:16]}"


async def collect(
    ws: Workspace,
    count: int,
    *,
    after: int | None = None,
    on_event: Callable[[WorkspaceEvent], Any] | None = None,
) -> list[WorkspaceEvent]:
    """Follow `ws` live until `count` `Event`s arrived (at most WAIT seconds); all items seen."""
    items: list[WorkspaceEvent] = []
    events = 0
    with anyio.fail_after(WAIT):
        async for item in ws.events(after=after):
            items.append(item)
            if on_event is not None:
                result = on_event(item)
                if hasattr(result, "__await__"):
                    await result
            if isinstance(item, Event):
                events += 1
                if events == count:
                    break
    return items


def data_of(items: list[WorkspaceEvent]) -> list[Any]:
    return [item.data for item in items if isinstance(item, Event)]


# --------------------------------------------------------------------------- signed tokens


class TokenSigner:
    """Mints hrt1 tokens as PROTOCOL.md describes, for a relay given `pubkey_hex`."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.pubkey_hex = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def token(self, **claims: Any) -> str:
        claims.setdefault("sub", "sdk-test")
        claims.setdefault("exp", 0)
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        signed = f"hrt1.{payload}"
        sig = base64.urlsafe_b64encode(self._key.sign(signed.encode())).rstrip(b"=").decode()
        return f"{signed}.{sig}"


# --------------------------------------------------------------------------- a lossy network


class DroppingProxy:
    """A TCP proxy to a relay that can cut connections just as a response starts.

    `drop_responses(n)`: the next `n` responses from the relay are discarded and
    their client connections closed, so the relay has done the work but the
    client never hears the answer — exactly when a retry could duplicate.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._to_drop = 0
        self.dropped = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop_responses(self, n: int) -> None:
        with self._lock:
            self._to_drop = n

    def _take_drop(self) -> bool:
        with self._lock:
            if self._to_drop > 0:
                self._to_drop -= 1
                self.dropped += 1
                return True
            return False

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._sockets += [conn, upstream]
            threading.Thread(target=self._pipe, args=(conn, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if responses and self._take_drop():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


# --------------------------------------------------------------------------- an older relay


class OlderRelay(httpx.AsyncBaseTransport):
    """Forwards to a real relay but hides extensions, to exercise the SDK's fallbacks.

    events: "ok" (as the relay serves it), "404", "405", "json" (200 but not an
    event stream), or "nudges" (ignores `bodies=1`). `long_poll=False` drops
    `wait=` so reads answer at once, as a relay without long-poll would.
    """

    def __init__(self, events: str = "ok", *, long_poll: bool = True) -> None:
        self.events = events
        self.long_poll = long_poll
        self._inner = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        self.paths.append(f"{request.method} {url.path}?{url.query.decode()}")
        headers = dict(request.headers)
        if url.path.endswith("/events"):
            if self.events in ("404", "405"):
                status = int(self.events)
                return httpx.Response(
                    status, json={"error": "not_found", "message": "no such route"}
                )
            if self.events == "json":
                return httpx.Response(200, json={"hello": "not a stream"})
            if self.events == "nudges":
                url = url.copy_remove_param("bodies").copy_remove_param("after")
                headers.pop("last-event-id", None)
        if not self.long_poll and url.path.endswith("/envelopes"):
            url = url.copy_remove_param("wait")
        forwarded = httpx.Request(
            request.method,
            url,
            headers=headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return await self._inner.handle_async_request(forwarded)

    async def aclose(self) -> None:
        await self._inner.aclose()
