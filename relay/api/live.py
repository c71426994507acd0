"""Live delivery: the SSE nudge stream, SSE with bodies, and the WebSocket.

Every stream follows one recipe, which is what makes "no duplicate, no hole"
hold: subscribe to the hub first, then replay retained rows from the store past
the cursor, then send live items, skipping any seq at or below the cursor.
Each stream holds a slot (global and per-client caps) for its whole life and
ends cleanly when the relay shuts down or the subscriber falls too far behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from relay.access import Denied, bearer_token
from relay.api.common import authorize, denied_error, header, int_param, workspace_id
from relay.api.envelopes import KEY_RULE, dedup_key, read_headers
from relay.errors import RelayError, error_response, store_error_response
from relay.hub import Subscriber, Wake, nudge_frame, sse_row_frame, ws_env_frame
from relay.logs import STREAM_ABANDONED
from relay.runtime import Relay
from relay.store.base import MAX_U64, Page, StoreError, row_seq

LOG = logging.getLogger("relay.live")
REPLAY_PAGE = 1000
CONNECTED = b": connected\n\n"
KEEPALIVE = b": keep-alive\n\n"
WS_GOING_AWAY = 1001
WS_POLICY = 1008
WS_SERVER_ERROR = 1011
WS_TRY_LATER = 1013
# Replies (acks, errors) a WebSocket may have queued before its reader stops
# taking frames; past it the client's frames wait in its own socket.
OUTBOX_BYTES = 64 * 1024
MAX_REF_BYTES = 256  # the longest `ref` a pub may carry (it is echoed)
EXPIRED_EVENT = (
    b'event: expired\ndata: {"error":"token_expired",'
    b'"message":"the bearer token has expired; reconnect with a fresh token"}\n\n'
)


def denied_event(denied: Denied) -> bytes:
    """The SSE stream's last event when a reload no longer accepts its token."""
    data = msgspec.json.encode({"error": denied.code, "message": denied.message})
    return b"event: revoked\ndata: %b\n\n" % data


def denied_reason(denied: Denied) -> str:
    """The WebSocket close reason (at most 123 bytes) for the same case."""
    if denied.code == "token_revoked":
        return "token revoked"
    if denied.status == 403:
        return "token no longer grants this workspace"
    return "token no longer accepted"


def _at_expiry(expires: int, stop: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Call `stop` when the grant's `exp` passes (never for a grant without one)."""
    if not expires:
        return None
    delay = max(0.0, expires - time.time())
    return asyncio.get_running_loop().call_later(delay, stop)


# ---------------------------------------------------------------------- SSE
def _start_cursor(request: Request) -> int | None:
    after = int_param(request, "after", 0, 0, MAX_U64) if "after" in request.query_params else None
    last_id = request.headers.get("last-event-id")
    if last_id is not None and last_id.strip():
        text = last_id.strip()
        if not text.isascii() or not text.isdigit() or int(text) > MAX_U64:
            raise RelayError(400, "invalid_last_event_id", "Last-Event-ID must be a seq")
        return int(text)
    return after


async def events(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    checked = relay.streams.generation
    grant = authorize(relay, request, ws)
    bodies = request.query_params.get("bodies", "0").lower()
    if bodies not in ("0", "1", "true", "false"):
        raise RelayError(400, "invalid_bodies", "bodies must be 1 or 0")
    with_bodies = bodies in ("1", "true")
    cursor = _start_cursor(request)  # checked on every stream; used only with bodies
    client = relay.client(request.scope)
    if relay.hub.closing:
        raise RelayError(503, "shutting_down", "the relay is shutting down", retry_after=2)
    stream = SSEStream(relay, ws, client, with_bodies, cursor if with_bodies else None)
    stream.expires = grant.expires
    stream.token = bearer_token(header(request, b"authorization"))
    stream.checked = checked
    return stream


class SSEStream(Response):
    """A text/event-stream answer that holds one stream slot while it is sent."""

    def __init__(
        self, relay: Relay, ws: str, client: str, bodies: bool, cursor: int | None
    ) -> None:
        self.relay = relay
        self.ws = ws
        self.client = client
        self.bodies = bodies
        self.cursor = cursor
        self.status_code = 200
        self.background = None
        self.started = False
        self.expires = 0  # the token's exp: the stream ends then
        self.expired = False
        self.token: str | None = None  # rechecked when the access files are reloaded
        self.checked: int | None = None  # relay.streams.generation when it was checked
        self.denied: Denied | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with self.relay.slots.hold(self.client):
                await self._serve(scope, receive, send)
        except RelayError as exc:
            if self.started:
                raise
            # No slot free: the stream never began, so this is its JSON answer.
            await error_response(exc.status, exc.code, exc.message, exc.headers)(
                scope, receive, send
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = self.relay
        settings = relay.settings
        with relay.hub.subscribe(
            self.ws, settings.stream_buffer, settings.stream_buffer_bytes
        ) as sub:
            # A bare cancel scope and one plain task (not a task group): an idle
            # stream is mostly what it holds while it waits (docs/benchmarks.md).
            with anyio.CancelScope() as cancel_scope:

                def expire() -> None:
                    self.expired = True
                    cancel_scope.cancel()

                def deny(denied: Denied) -> None:
                    self.denied = denied
                    cancel_scope.cancel()

                expiry = _at_expiry(self.expires, expire)

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    cancel_scope.cancel()

                watcher = asyncio.get_running_loop().create_task(watch_disconnect())
                sub.on_overflow = cancel_scope.cancel
                sub.replaying = True
                try:
                    with relay.streams.hold(self.token, self.ws, deny, self.checked):
                        await self._stream(sub, send)
                except StoreError as exc:
                    if not self.started:  # still a normal JSON error answer
                        await store_error_response(exc)(scope, receive, send)
                        return
                    # Mid-stream the answer has begun: end it; the client resumes
                    # from its last id and meets the 503 while the store is down.
                    LOG.warning("the store failed during a live stream; ending it")
                    await _end(send)
                finally:
                    watcher.cancel()
                    if expiry is not None:
                        expiry.cancel()
            if self.denied is not None and not self.started:
                refusal = denied_error(self.denied)
                await error_response(
                    refusal.status, refusal.code, refusal.message, refusal.headers
                )(scope, receive, send)
            elif self.denied is not None:
                LOG.info("ended an SSE stream: a reload no longer accepts its token")
                await _end(send, denied_event(self.denied))
            elif self.expired and not self.started:  # expired while it was being set up
                await error_response(
                    401,
                    "unauthorized",
                    "the bearer token has expired",
                    {"www-authenticate": "Bearer"},
                )(scope, receive, send)
            elif self.expired:
                LOG.info("ended an SSE stream: its token expired")
                await _end(send, EXPIRED_EVENT)
            elif sub.overflowed:
                relay.metrics.slow_consumers.inc()
                LOG.info("disconnected a slow SSE subscriber")
                await _end(send)

    async def _stream(self, sub: Subscriber, send: Send) -> None:
        relay = self.relay
        page = await relay.store.read(self.ws, self.cursor or 0, 1, 1)
        cursor = page.head if self.cursor is None else self.cursor
        headers = read_headers(page, cursor, relay.store.epoch)
        headers.pop("x-relay-more", None)
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *((k.encode(), v.encode()) for k, v in headers.items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        self.started = True
        first = CONNECTED
        if self.bodies:
            if page.gap(cursor):
                first += b'event: gap\ndata: {"oldest":%d}\n\n' % page.oldest
            await send({"type": "http.response.body", "body": first, "more_body": True})
            cursor = await self._replay(sub, send, cursor)
        else:
            first += nudge_frame(page.head)
            await send({"type": "http.response.body", "body": first, "more_body": True})
        sub.replaying = False
        keepalive = relay.settings.keepalive_secs
        while not sub.closed:
            if not await sub.wait(keepalive):
                await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                continue
            if sub.overflowed or sub.closed:
                break
            items = sub.take()
            if self.bodies:
                frames = [it.sse_frame for it in items if it.seq > cursor]
            else:
                frames = [it.nudge_frame for it in items if it.seq > cursor]
            if frames:
                cursor = items[-1].seq
                await send(
                    {"type": "http.response.body", "body": b"".join(frames), "more_body": True}
                )
        if not sub.overflowed:
            await _end(send)

    async def _replay(self, sub: Subscriber, send: Send, cursor: int) -> int:
        async def send_rows(rows: list[bytes]) -> None:
            if rows:
                frames = b"".join(sse_row_frame(row_seq(r), r) for r in rows)
                await send({"type": "http.response.body", "body": frames, "more_body": True})

        return await replay(self.relay, self.ws, sub, cursor, send_rows)


async def replay(
    relay: Relay,
    ws: str,
    sub: Subscriber,
    cursor: int,
    send_rows: Callable[[list[bytes]], Awaitable[None]],
) -> int:
    """Hand every retained row past `cursor` to `send_rows`, a page at a time
    (an empty page too); the cursor it reached.

    SSE and the WebSocket both replay through here. Live items queued meanwhile
    are dropped from the queue (the store has them) until the replay catches up.
    """
    while True:
        page = await relay.store.read(ws, cursor, REPLAY_PAGE, relay.settings.max_page_bytes)
        await send_rows(page.rows)
        if page.rows:
            cursor = row_seq(page.rows[-1])
        if not page.more:
            if sub.overflowed:
                # Fell behind while replaying: the store still has it all; go again.
                sub.overflowed = False
                sub.take()
                continue
            return cursor


async def _end(send: Send, last: bytes = b"") -> None:
    """Send the answer's last chunk (`last`, then the end) if the peer takes it within a second.

    A peer that stopped reading (gone without a reset, or stalled) would hold it
    until uvicorn's shutdown timeout; past the second the stream ends without it
    and uvicorn drops the connection (its "incomplete answer" line is dropped too:
    relay/logs.py). A peer that already left makes the send a no-op.
    """
    with anyio.move_on_after(1) as scope:
        if last:
            await send({"type": "http.response.body", "body": last, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    if scope.cancelled_caught:
        STREAM_ABANDONED.set(True)
        LOG.debug("SSE peer not reading: the stream ends without its last chunk")


# ----------------------------------------------------------------- WebSocket
class WsOp(msgspec.Struct, forbid_unknown_fields=False):
    op: str
    after: int | None = None
    # An empty Raw means "absent" (msgspec cannot tell a Raw from null in a union).
    body: msgspec.Raw = msgspec.Raw(b"")
    key: str | None = None
    ref: msgspec.Raw = msgspec.Raw(b"")


def _ws_token(websocket: WebSocket) -> tuple[str | None, str | None]:
    """(token, subprotocol to accept) from the Authorization header or `bearer.<token>`."""
    token = bearer_token(websocket.headers.get("authorization"))
    offered = [
        p.strip()
        for p in websocket.headers.get("sec-websocket-protocol", "").split(",")
        if p.strip()
    ]
    chosen = next((p for p in offered if not p.startswith("bearer.")), None)
    for proto in offered:
        if proto.startswith("bearer.") and token is None:
            token = proto[len("bearer.") :] or None
            chosen = chosen or proto
    return token, chosen


async def _deny(
    websocket: WebSocket,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(status, code, message, headers))
    else:  # pragma: no cover - every server we run supports denial responses
        await websocket.close(WS_POLICY, code)


async def websocket(websocket: WebSocket) -> None:
    relay: Relay = websocket.app.state.relay
    try:
        ws = workspace_id(websocket)  # type: ignore[arg-type]
    except RelayError as exc:
        await _deny(websocket, exc.status, exc.code, exc.message)
        return
    token, subprotocol = _ws_token(websocket)
    checked = relay.streams.generation
    try:
        grant = relay.policy.authenticate(token)
    except Denied as exc:
        await _deny(websocket, 401, exc.code, exc.message, {"www-authenticate": "Bearer"})
        return
    if not grant.allows(ws):
        await _deny(websocket, 403, "forbidden", "the bearer token does not grant this workspace")
        return
    client = relay.client(websocket.scope)
    if relay.hub.closing:
        await _deny(
            websocket, 503, "shutting_down", "the relay is shutting down", {"retry-after": "2"}
        )
        return
    try:
        with relay.slots.hold(client):
            session = WsSession(relay, websocket, ws, client, grant.expires)
            session.token = token
            session.checked = checked
            await session.run(subprotocol)
    except RelayError as exc:
        if websocket.application_state is not WebSocketState.CONNECTING:
            raise
        # No slot free: refused before the handshake is answered.
        await _deny(websocket, exc.status, exc.code, exc.message, exc.headers)


class WsSession:
    def __init__(
        self, relay: Relay, websocket: WebSocket, ws: str, client: str, expires: int = 0
    ) -> None:
        self.relay = relay
        self.socket = websocket
        self.ws = ws
        self.client = client
        self.expires = expires  # the token's exp: the socket is closed then
        self.expired = False
        self.token: str | None = None  # rechecked when the access files are reloaded
        self.checked: int | None = None  # relay.streams.generation when it was checked
        self.denied: Denied | None = None
        # Replies waiting for the writer, and their size: the reader stops taking
        # frames while it is above OUTBOX_BYTES, until the writer drains it.
        self.outbox: deque[str] = deque()
        self.outbox_bytes = 0
        self.drained = Wake()
        self.cursor: int | None = None  # None until the client subscribes
        self.replay_from: int | None = None
        self.close_code = 1000
        self.close_reason = ""

    async def run(self, subprotocol: str | None) -> None:
        relay = self.relay
        page = await relay.store.read(self.ws, 0, 1, 1)
        headers = read_headers(page, 0, relay.store.epoch)
        headers.pop("x-relay-gap", None)
        headers.pop("x-relay-more", None)
        await self.socket.accept(
            subprotocol=subprotocol, headers=[(k.encode(), v.encode()) for k, v in headers.items()]
        )
        settings = relay.settings
        with relay.hub.subscribe(
            self.ws, settings.stream_buffer, settings.stream_buffer_bytes
        ) as sub:
            async with anyio.create_task_group() as tg:
                sub.on_overflow = tg.cancel_scope.cancel
                sub.replaying = False
                sub.active = False  # until the client sends `sub`

                def expire() -> None:
                    self.expired = True
                    tg.cancel_scope.cancel()

                def deny(denied: Denied) -> None:
                    self.denied = denied
                    tg.cancel_scope.cancel()

                expiry = _at_expiry(self.expires, expire)
                tg.start_soon(self._reader, sub, tg.cancel_scope.cancel)
                try:
                    with relay.streams.hold(self.token, self.ws, deny, self.checked):
                        await self._writer(sub)
                except WebSocketDisconnect:
                    self.close_code = -1  # the client went away mid-send: not an error
                finally:
                    if expiry is not None:
                        expiry.cancel()
                tg.cancel_scope.cancel()
            if sub.overflowed:
                relay.metrics.slow_consumers.inc()
            if self.close_code == -1:
                pass  # the peer has gone: whatever else ended the stream, no one to tell
            elif self.denied is not None:
                LOG.info("closed a WebSocket: a reload no longer accepts its token")
                self.close_code, self.close_reason = WS_POLICY, denied_reason(self.denied)
            elif self.expired:
                LOG.info("closed a WebSocket: its token expired")
                self.close_code, self.close_reason = WS_POLICY, "token expired"
            elif sub.overflowed:
                self.close_code, self.close_reason = (
                    WS_TRY_LATER,
                    "slow consumer: resume from your cursor",
                )
            elif sub.closed and relay.hub.closing:
                self.close_code, self.close_reason = WS_GOING_AWAY, "relay shutting down"
        if self.close_code != -1:
            await self._close()

    async def _close(self) -> None:
        """Send the close frame; a peer that left meanwhile is normal, not an error."""
        # A paused transport (the peer stopped reading) may hold the close: wait a
        # second, then let uvicorn drop the connection. A peer that resets while we
        # wait, or already has, surfaces as WebSocketDisconnect (Starlette's word for
        # uvicorn's ClientDisconnected), OSError, or RuntimeError (uvicorn already
        # closed it, e.g. a ping timeout).
        with anyio.move_on_after(1):
            try:
                await self.socket.close(self.close_code, self.close_reason)
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:
                LOG.debug(
                    "WebSocket peer gone before the close %d (%s)",
                    self.close_code,
                    type(exc).__name__,
                )

    def _post(self, sub: Subscriber, frame: str) -> None:
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)
        sub.wake.set()

    async def _flush_outbox(self, send_text: Callable[[str], Awaitable[None]]) -> None:
        outbox = self.outbox
        while outbox:
            frame = outbox.popleft()
            self.outbox_bytes -= len(frame)
            await send_text(frame)
        self.drained.set()

    def _allowed(self) -> RelayError | None:
        """Spend one of the client's push tokens on a frame; the refusal, if any.

        Every frame costs, whatever it is, before anything is answered: a flood
        of invalid frames spends the same budget as a flood of pubs.
        """
        try:
            self.relay.push_limiter.take(self.client)
        except RelayError as exc:
            return exc
        return None

    async def _reader(self, sub: Subscriber, stop: Callable[[], None]) -> None:
        relay = self.relay
        max_body = relay.settings.max_body_bytes
        try:
            while True:
                while self.outbox_bytes > OUTBOX_BYTES:  # output blocked: stop reading
                    self.drained.clear()
                    await self.drained.wait(None)
                message = await self.socket.receive()
                if message["type"] == "websocket.disconnect":
                    self.close_code = -1
                    break
                data = message.get("text")
                raw = data.encode() if data is not None else message.get("bytes") or b""
                try:
                    op = msgspec.json.decode(raw, type=WsOp)
                except (msgspec.DecodeError, RecursionError) as exc:
                    if self._invalid(
                        sub, stop, "invalid_frame", f"the frame is not a valid op: {exc}"
                    ):
                        break
                    continue
                ref = bytes(op.ref) or b"null"
                if len(ref) > MAX_REF_BYTES:
                    if self._invalid(
                        sub, stop, "invalid_ref", f"ref must be at most {MAX_REF_BYTES} bytes"
                    ):
                        break
                    continue
                refused = self._allowed()
                if refused is not None:
                    if op.op not in ("sub", "pub"):
                        self._refuse_flood(stop)
                        break
                    retry_after = refused.headers.get("retry-after")
                    self._post(sub, _ws_error(refused.code, refused.message, ref, retry_after))
                    continue
                if op.op == "sub":
                    after = op.after or 0
                    if not 0 <= after <= MAX_U64:
                        self._post(sub, _ws_error("invalid_after", "after must be a seq"))
                        continue
                    self.replay_from = after
                    sub.active = True
                    sub.wake.set()
                elif op.op == "pub":
                    self._post(sub, await self._publish(op, ref, max_body))
                else:
                    self._post(
                        sub,
                        _ws_error("unknown_op", f"unknown op {op.op[:64]!r}; use sub or pub"),
                    )
        except WebSocketDisconnect:
            self.close_code = -1
        finally:
            sub.close()

    def _invalid(self, sub: Subscriber, stop: Callable[[], None], code: str, message: str) -> bool:
        """Answer an invalid frame, or close the socket when it comes past the client's rate.

        True when the socket is being closed (the reader stops).
        """
        if self._allowed() is not None:
            self._refuse_flood(stop)
            return True
        self._post(sub, _ws_error(code, message))
        return False

    def _refuse_flood(self, stop: Callable[[], None]) -> None:
        """An invalid frame past the client's rate: close rather than answer it."""
        LOG.info("closed a WebSocket that sent invalid frames past its rate")
        self.close_code, self.close_reason = WS_POLICY, "too many invalid frames; slow down"
        stop()

    async def _publish(self, op: WsOp, ref: bytes, max_body: int) -> str:
        relay = self.relay
        body = bytes(op.body)
        if not body:
            return _ws_error("invalid_body", "pub needs a body", ref)
        if len(body) > max_body:
            return _ws_error("payload_too_large", f"the body exceeds {max_body} bytes", ref)
        key = dedup_key(op.key, body)
        if key is None:
            return _ws_error("invalid_idempotency_key", f"key must be {KEY_RULE}", ref)
        if not body.isascii():
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                return _ws_error("invalid_json", "the body is not valid UTF-8", ref)
        try:
            seq, dup = await relay.store.append(self.ws, body, key)
        except StoreError as exc:  # a store refusal reaches the client as a frame
            return _ws_error(exc.code, exc.message, ref)
        except Exception:  # a relay bug: logged here with its traceback, opaque to the client
            LOG.exception("unexpected error appending a WebSocket pub")
            return _ws_error("internal_error", "the relay hit an unexpected error", ref)
        (relay.metrics.duplicates if dup else relay.metrics.appended).inc()
        return '{"op":"ack","seq":%d,"ref":%s,"duplicate":%s}' % (
            seq,
            ref.decode(),
            "true" if dup else "false",
        )

    async def _writer(self, sub: Subscriber) -> None:
        relay = self.relay
        send_text: Callable[[str], Awaitable[None]] = self.socket.send_text
        keepalive = relay.settings.keepalive_secs
        while not sub.closed:
            if not self.outbox and self.replay_from is None:
                await sub.wait(keepalive)
            if sub.overflowed or (sub.closed and not self.outbox):
                break
            if self.outbox:
                await self._flush_outbox(send_text)
            if self.replay_from is not None:
                self.cursor = self.replay_from
                self.replay_from = None
                sub.take()
                sub.replaying = True
                try:
                    await self._replay(sub, send_text)
                except StoreError:
                    self.close_code, self.close_reason = WS_SERVER_ERROR, "store unavailable"
                    return
                sub.replaying = False
                continue
            items = sub.take()
            if self.cursor is None:
                continue
            frames = [it.ws_frame for it in items if it.seq > self.cursor]
            if frames:
                self.cursor = items[-1].seq
                for frame in frames:
                    await send_text(frame)

    async def _replay(self, sub: Subscriber, send_text: Callable[[str], Awaitable[None]]) -> None:
        relay = self.relay
        assert self.cursor is not None
        page: Page = await relay.store.read(self.ws, self.cursor, 1, 1)
        if page.gap(self.cursor):
            await send_text('{"op":"gap","oldest":%d}' % page.oldest)

        async def send_rows(rows: list[bytes]) -> None:
            for row in rows:
                await send_text(ws_env_frame(row))
            if self.outbox:
                await self._flush_outbox(send_text)

        self.cursor = await replay(relay, self.ws, sub, self.cursor, send_rows)


def _ws_error(code: str, message: str, ref: bytes = b"null", retry_after: str | None = None) -> str:
    out = {"op": "error", "error": code, "message": message}
    encoded = msgspec.json.encode(out)[:-1]
    if ref != b"null":
        encoded += b',"ref":' + ref
    if retry_after is not None:
        encoded += b',"retry_after":' + retry_after.encode()
    return (encoded + b"}").decode()


__all__ = ["SSEStream", "events", "websocket"]
