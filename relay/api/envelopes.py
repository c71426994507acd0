"""Envelopes: push one, push a batch, read after a cursor (optionally long-polling)."""

from __future__ import annotations

import hashlib
import re
import sys

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from relay.access import Denied, bearer_token
from relay.api.common import (
    ShapeError,
    authorize,
    check_json,
    denied_error,
    header,
    int_param,
    parse_json,
    read_body,
    workspace_id,
)
from relay.errors import RelayError, add_security_headers, bad_request
from relay.runtime import Relay
from relay.server import header_lines
from relay.store.base import MAX_U64, Page
from relay.wire import Buffers, vectored

MAX_KEY_LEN = 200
MAX_BATCH = 1000
MAX_LIMIT = 10_000  # the most rows one read may ask for
MAX_WAIT = 60


# One rule for every transport: a client-chosen key is 1–200 visible ASCII
# characters (0x21–0x7E), compared byte for byte. HTTP headers arrive as bytes
# (decoded here as latin-1, so each character is one byte) and WebSocket keys as JSON
# strings; a key allowed by the rule is the same bytes either way.
KEY_RULE = f"1–{MAX_KEY_LEN} visible ASCII characters (! to ~, no spaces)"
_KEY_RE = re.compile(r"[!-~]{1,%d}" % MAX_KEY_LEN)


def dedup_key(chosen: str | None, body: bytes) -> bytes | None:
    """The key an envelope is deduplicated by, for HTTP and WebSocket alike.

    A client-chosen key when there is one (None when it breaks KEY_RULE), else
    the body's SHA-256 digest, so a retried identical body is one envelope.
    """
    if chosen is None:
        return hashlib.sha256(body).digest()
    if _KEY_RE.fullmatch(chosen) is None:
        return None
    # Prefixed so a client-chosen key can never equal a body digest (32 raw bytes).
    return b"k" + chosen.encode("ascii")


def _header_key(value: str | None, name: str, body: bytes) -> bytes:
    key = dedup_key(value, body)
    if key is None:
        raise bad_request("invalid_idempotency_key", f"{name} must be {KEY_RULE}")
    return key


def _request_key(request: Request, body: bytes) -> bytes:
    event_id = header(request, b"x-hive-event-id")
    value = header(request, b"idempotency-key")
    if event_id is not None:
        # Checked even when an Idempotency-Key overrides it: a bad header is an error.
        key = _header_key(event_id, "X-Hive-Event-Id", body)
        if value is None:
            return key
    return _header_key(value, "Idempotency-Key", body)


def limit_push(relay: Relay, request: Request) -> None:
    if relay.push_limiter.enabled:
        relay.push_limiter.take(relay.client(request.scope))


class JSONBytes(Response):
    """A prebuilt JSON answer that sets Response's attributes itself.

    Response.__init__ renders the body and assembles the headers generically; on
    a read answer, which carries paging headers, that is a measurable share of the
    request, so this sets the same attributes directly (tests/test_server_internals.py checks
    they stay the ones Starlette's own constructor sets).
    """

    media_type = "application/json"

    def __init__(self, body: bytes | Buffers, headers: dict[str, str] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.body = body  # type: ignore[assignment]  # Buffers: relay.wire
        raw = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        if headers:
            raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.raw_headers = raw


async def post_envelope(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    limit_push(relay, request)
    body = await read_body(request, relay.settings.max_body_bytes)
    check_json(body)
    key = _request_key(request, body)
    seq, duplicate = await relay.store.append(ws, body, key)
    if duplicate:
        relay.metrics.duplicates.inc()
        return JSONBytes(b'{"seq":%d,"duplicate":true}' % seq)
    relay.metrics.appended.inc()
    return JSONBytes(b'{"seq":%d}' % seq)


async def post_batch(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    limit_push(relay, request)
    body = await read_body(request, relay.settings.max_body_bytes)
    try:
        elements = parse_json(body, list[msgspec.Raw])  # validates every element too
    except ShapeError:
        raise bad_request("invalid_batch", "the batch body must be a JSON array") from None
    if not 1 <= len(elements) <= MAX_BATCH:
        raise bad_request("invalid_batch", f"a batch holds 1–{MAX_BATCH} envelopes")
    bodies = [bytes(e) for e in elements]
    keys_header = header(request, b"idempotency-keys")
    if keys_header is None:
        keys = [_header_key(None, "Idempotency-Keys", b) for b in bodies]
    else:
        parts = [p.strip() for p in keys_header.split(",")]
        if len(parts) != len(bodies):
            raise bad_request(
                "invalid_idempotency_key",
                f"Idempotency-Keys has {len(parts)} entries for {len(bodies)} envelopes",
            )
        keys = [
            _header_key(p or None, "each Idempotency-Keys entry", b)
            for p, b in zip(parts, bodies, strict=True)
        ]
    results = await relay.store.append_batch(ws, bodies, keys)
    fresh = sum(1 for _, dup in results if not dup)
    relay.metrics.appended.inc(fresh)
    if fresh != len(results):
        relay.metrics.duplicates.inc(len(results) - fresh)
    out = msgspec.json.encode(
        {"seqs": [s for s, _ in results], "duplicates": [d for _, d in results]}
    )
    return JSONBytes(out)


def read_headers(page: Page, after: int, epoch: str) -> dict[str, str]:
    headers = {
        "x-relay-head": str(page.head),
        "x-relay-oldest": str(page.oldest),
        "x-relay-epoch": epoch,
    }
    if page.gap(after):
        headers["x-relay-gap"] = "true"
    if page.more:
        headers["x-relay-more"] = "true"
    return headers


def cursor_params(request: Request) -> tuple[int, int]:
    after = int_param(request, "after", 0, 0, MAX_U64)
    limit = int_param(request, "limit", sys.maxsize, 1, MAX_LIMIT)
    return after, limit


async def get_envelopes(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    checked = relay.streams.generation  # the access policy this request is checked against
    authorize(relay, request, ws)
    after, limit = cursor_params(request)
    wait = int_param(request, "wait", 0, 0, MAX_WAIT)
    max_page = relay.settings.max_page_bytes
    store = relay.store
    page = await store.read(ws, after, limit, max_page)
    # A big page leaves as slices of the store's row chunks when the server can
    # write them as they are (relay.wire), else as one joined body.
    pieces = vectored(request.scope)
    if wait and page.empty:
        if not relay.hub.closing:
            page = await _long_poll(relay, request, ws, after, limit, wait, checked)
        # An empty answer to a long-poll depends on when it ended: never cached.
        return JSONBytes(page.body(pieces), read_headers(page, after, store.epoch))
    return _read_answer(relay, request, ws, after, page, pieces)[0]


def _read_answer(
    relay: Relay, request: Request, ws: str, after: int, page: Page, pieces: bool
) -> tuple[JSONBytes, bytes | None]:
    """A read's answer, cached when the relay caches pages; and its prebuilt header
    lines (relay/server.py), when cached. `pieces`: the server writes a body of
    several buffers (relay.wire) as they are."""
    response = JSONBytes(page.body(pieces), read_headers(page, after, relay.store.epoch))
    pages = relay.pages
    if pages is None:
        return response, None
    # No await since the read: the answer shows the workspace as it is now.
    # Cached with its security headers (the front lane adds none to a list that
    # has them), keyed by the query string, which is all that shapes it; with the
    # header lines prebuilt too, so that a reader's answer is written from bytes.
    add_security_headers(response.raw_headers, relay.extra_headers)
    lines = header_lines(response.raw_headers)
    pages.cache_page(
        ws,
        request.scope["query_string"],
        (response.raw_headers, response.body, lines),
        len(response.body) + len(lines),
    )
    return response, lines


def read_now(relay: Relay, request: Request) -> tuple[bytes, bytes | Buffers] | None:
    """`get_envelopes` without an await, for a store that reads synchronously (the
    memory store's `read_now`): (header lines, body) of the answer, cached as
    `get_envelopes` caches it. None when this read is not that case (a long-poll's
    `wait`, another store) or would not be a 200 (a bad parameter, a refused
    token): the endpoint then runs and answers it. The herd's readers all ask for
    the same new page at once, before any of their tasks has run: the first one
    builds it here and the rest are answered from the cache."""
    store_read = getattr(relay.store, "read_now", None)
    if store_read is None:
        return None
    try:
        ws = workspace_id(request)
        authorize(relay, request, ws)
        after, limit = cursor_params(request)
        if int_param(request, "wait", 0, 0, MAX_WAIT):
            return None
        page = store_read(ws, after, limit, relay.settings.max_page_bytes)
    except RelayError:
        return None
    response, lines = _read_answer(relay, request, ws, after, page, vectored(request.scope))
    body: bytes | Buffers = response.body  # type: ignore[assignment]  # or a big page's slices (relay.wire)
    return (header_lines(response.raw_headers) if lines is None else lines), body


async def _long_poll(
    relay: Relay, request: Request, ws: str, after: int, limit: int, wait: int, checked: int
) -> Page:
    """Hold the request until a row past `after` exists or `wait` seconds pass.

    A long-poll holds a live-stream slot. The hub wakes it on append; a client
    that disconnects is noticed by the watcher and frees its slot at once.
    """
    import anyio

    client = relay.client(request.scope)
    page: Page | None = None
    denials: list[Denied] = []

    def deny(denied: Denied) -> None:  # a reload no longer accepts the token
        denials.append(denied)
        waiter.close()

    token = bearer_token(header(request, b"authorization"))
    with (
        relay.slots.hold(client),
        relay.hub.subscribe(ws, 0) as waiter,
        relay.streams.hold(token, ws, deny, checked),
    ):
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                waiter.close()

            tg.start_soon(watch_disconnect)
            with anyio.move_on_after(wait):
                while True:
                    waiter.wake.clear()
                    # Read first: a row may have landed between the caller's read
                    # and the subscription.
                    page = await relay.store.read(ws, after, limit, relay.settings.max_page_bytes)
                    if not page.empty or waiter.closed:
                        break
                    await waiter.wait(None)
            tg.cancel_scope.cancel()
    if denials:
        raise denied_error(denials[0])
    if page is None or page.empty:
        page = await relay.store.read(ws, after, limit, relay.settings.max_page_bytes)
    return page


__all__ = ["get_envelopes", "post_batch", "post_envelope"]
