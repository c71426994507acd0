"""create_app(settings) → the Starlette app. The lifespan owns the store, the
hub, the house-keeping sweep and the snapshot writer."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from relay import logs
from relay.access import access_from_settings, read_key_file, read_revocations, read_token_file
from relay.api import envelopes, live, public, side, status
from relay.api.common import authorize_scope
from relay.errors import (
    RelayError,
    add_security_headers,
    error_response,
    headers_too_large,
    hsts_headers,
    store_error_response,
    store_error_status,
)
from relay.hub import Hub
from relay.limits import RateLimiter, StreamSlots
from relay.metrics import BUCKETS, Metrics
from relay.reload import Reloader
from relay.runtime import Relay
from relay.settings import Settings, SettingsError
from relay.status import RoundTrip, Sampler, rate, window_quantile
from relay.store import open_store
from relay.store.base import (
    BudgetedStore,
    LocalStatsStore,
    PageCachingStore,
    Store,
    StoreError,
    SweepingStore,
    WatchingStore,
)
from relay.tls import CertificateError, CertReloader
from relay.wire import Buffers, vectored

LOG = logging.getLogger("relay")
SWEEP_INTERVAL = 30.0

Endpoint = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class RouteSpec:
    """One route, declared once. The router, the hot lane, the metrics' timing rule
    and the CORS lists all read this table.

    `endpoints` maps each HTTP method to its endpoint (HEAD is served by GET's
    unless named); a WebSocket route has `socket` instead. `hot` routes are served
    in front of Starlette's router; `live` ones hold a stream open, so their
    duration is not a latency sample. `channel` is passed to side-channel
    endpoints as `channel=`. `reads` and `sets` are the request and response
    headers a browser client needs CORS to allow or expose.
    """

    path: str
    name: str
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)
    socket: Callable[[WebSocket], Awaitable[None]] | None = None
    hot: bool = False
    live: bool = False
    channel: str | None = None
    reads: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()

    def by_method(self) -> dict[str, Endpoint]:
        """Method → endpoint, with the side channel bound and HEAD served by GET."""
        out: dict[str, Endpoint] = {}
        for method, endpoint in self.endpoints.items():
            out[method] = (
                functools.partial(endpoint, channel=self.channel) if self.channel else endpoint
            )
        if "GET" in out:
            out.setdefault("HEAD", out["GET"])
        return out

    def route(self) -> BaseRoute:
        if self.socket is not None:
            return WebSocketRoute(self.path, self.socket, name=self.name)
        handlers = self.by_method()
        if len(set(self.endpoints.values())) == 1:
            endpoint = handlers[next(iter(self.endpoints))]
        else:
            # One route per path, so a 405 answer's Allow header names every method.
            async def endpoint(request: Request) -> Response:
                return await handlers[request.method](request)

        return Route(self.path, endpoint, methods=list(self.endpoints), name=self.name)


_WS = "/v1/workspaces/{ws}"
_PAGED = ("X-Relay-More", "X-Relay-Next")
_READ = ("X-Relay-Head", "X-Relay-Oldest", "X-Relay-Epoch", "X-Relay-Gap", *_PAGED)
ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        f"{_WS}/envelopes",
        "envelopes",
        {"GET": envelopes.get_envelopes, "POST": envelopes.post_envelope},
        hot=True,
        reads=("Idempotency-Key", "X-Hive-Event-Id"),
        sets=_READ,
    ),
    RouteSpec(
        f"{_WS}/envelopes/batch",
        "envelopes_batch",
        {"POST": envelopes.post_batch},
        reads=("Idempotency-Keys",),
    ),
    RouteSpec(
        f"{_WS}/events",
        "events",
        {"GET": live.events},
        hot=True,
        live=True,
        reads=("Last-Event-ID",),
        sets=_READ,
    ),
    RouteSpec(f"{_WS}/ws", "ws", socket=live.websocket, live=True),
    RouteSpec(
        f"{_WS}/keyring",
        "keyring",
        {"GET": side.get_keyring, "POST": side.post_keyring},
        sets=_PAGED,
    ),
    *(
        RouteSpec(
            f"{_WS}/{channel}",
            channel,
            {"GET": side.get_devices, "POST": side.post_device},
            channel=channel,
            sets=_PAGED,
        )
        for channel in ("presence", "candidates")
    ),
    RouteSpec("/v1/pair", "pair_create", {"POST": side.post_pair}),
    RouteSpec("/v1/pair/{code}", "pair_resolve", {"GET": side.get_pair}),
    RouteSpec("/v1/health", "health", {"GET": public.health, "HEAD": public.health}),
    RouteSpec("/", "status_page", {"GET": status.status_page}),
    RouteSpec("/v1/status/samples", "status_samples", {"GET": status.samples}, live=True),
    RouteSpec("/metrics", "metrics", {"GET": public.metrics}),
    RouteSpec("/openapi.json", "openapi", {"GET": public.openapi}),
)
LIVE_ROUTES = frozenset(spec.path for spec in ROUTES if spec.live)
PUBLISH_ROUTES = frozenset((f"{_WS}/envelopes", f"{_WS}/envelopes/batch"))
STATUS_STREAMS_PER_CLIENT = 4
# Sent to or read from every route: the bearer token, a POST body's type, a 429/503's wait.
_EVERY_READ = ("Authorization", "Content-Type")
_EVERY_SET = ("Retry-After",)


def _union(*lists: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name for names in lists for name in names))


def cors_lists() -> dict[str, list[str]]:
    """CORSMiddleware's method and header lists, from the route table."""
    return {
        "allow_methods": _union(
            *(spec.by_method() for spec in ROUTES if spec.socket is None), ["OPTIONS"]
        ),
        "allow_headers": _union(_EVERY_READ, *(spec.reads for spec in ROUTES)),
        "expose_headers": _union(*(spec.sets for spec in ROUTES), _EVERY_SET),
    }


def head_size(scope: Scope) -> int:
    """The request line and headers, as counted against HIVE_RELAY_HEADER_LIMIT."""
    head = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
    for name, value in scope.get("headers", ()):
        head += len(name) + len(value) + 4
    return head


def head_too_large(limit: int) -> Response:
    # relay/server.py cuts off a head that keeps arriving past the limit; one that
    # arrives whole in a single read is parsed first and stopped here.
    refusal = headers_too_large(limit)
    return error_response(refusal.status, refusal.code, refusal.message)


# A read with more headers than this is not kept (Front.keep): each kept scope
# then stays a few KiB.
KEPT_MAX_HEADERS = 32


@dataclass(frozen=True, slots=True)
class KeptRead:
    """A read's parse, kept by its bytes (Front.keep)."""

    scope: dict[str, Any]
    ws: str
    size: int  # head_size(scope)


def record(
    relay: Relay,
    scope: Scope,
    route: str,
    status: int,
    start: float,
    client: str | None = None,
) -> None:
    """The metrics sample and access-log line that end every request. `client` is
    the address to log, when the caller has it (else relay.address(scope))."""
    method = scope.get("method", "WS")
    end = time.perf_counter()
    duration = end - start
    relay.metrics.observe(
        route,
        method,
        status or 500,
        duration,
        # A live stream's or long-poll's duration is how long the client stayed.
        timed=route not in LIVE_ROUTES and b"wait=" not in scope.get("query_string", b""),
    )
    if relay.settings.access_log:
        if client is None:
            client = relay.address(scope)
        logs.access(method, route, status or 500, duration, client, end)


class Front:
    """The app's outermost layer: for every request the header limit, the security
    headers, the metrics sample and the log line; and the hot lane.

    The hot lane serves the routes marked `hot` (push and read envelopes, SSE)
    without Starlette's router. The router tries routes in order and wraps each
    endpoint in two exception-handling layers and a fresh Request; on the publish
    path that is a fifth of the relay's own time, and an idle SSE stream would
    hold those layers' frames for its whole life (docs/benchmarks.md). The lane
    maps errors with the app's own exception handlers. With CORS on, Starlette's
    CORSMiddleware wraps the lane as it wraps the router.

    Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched.
    """

    def __init__(
        self,
        relay: Relay,
        handlers: Mapping[Any, Callable[[Request, Exception], Response]],
        cors: Callable[[ASGIApp], ASGIApp] | None,
    ) -> None:
        self.app: ASGIApp = _no_stack
        self.relay = relay
        self.header_limit = relay.settings.header_limit
        # HSTS over direct TLS, when asked for (build_relay): on every answer.
        self.extra = relay.extra_headers
        self.handlers = handlers
        self.hot = [
            (compile_path(spec.path)[0], spec.route(), spec.by_method())
            for spec in ROUTES
            if spec.hot
        ]
        self.lane: ASGIApp = self._serve_hot if cors is None else cors(self._serve_hot)
        self.cors = cors is not None
        self.read: Endpoint = envelopes.get_envelopes
        # The read route, for answer_now: its path regex and its name in metrics and logs.
        self.reads_path = f"{_WS}/envelopes"
        self.reads = compile_path(self.reads_path)[0]
        # Read heads answered by answer_now, by their bytes, with what their parse
        # gave (`keep`): the HTTP protocol answers the same bytes again without
        # parsing them (relay/server.py, RelayHttpProtocol._remember).
        self.parsed: dict[bytes, KeptRead] = {}

    def _admits(self, scope: Scope, ws: str) -> bool:
        """The endpoint's own access check, for a cached read. A refusal is answered
        by the endpoint itself, which runs the check again and raises its error."""
        try:
            authorize_scope(self.relay, scope, ws)
        except RelayError:
            return False
        return True

    def answer_now(self, scope: Scope, write: Callable[[bytes, bytes | Buffers], None]) -> bool:
        """The protocol's question before it starts the app for a bodiless request:
        is the answer a read that needs no await (cached, or built now from a
        store that reads synchronously: `envelopes.read_now`)? If so it is handed
        to `write` (header lines, body) at once, with no task, and True returned;
        the metrics sample and the log line follow as for any request. The same
        checks as the endpoint's run first (the route, the header limit, the access
        check); without CORS only (CORSMiddleware answers by the request's Origin).
        Anything else (an error to answer, a long-poll) goes to the app."""
        pages = self.relay.pages
        if pages is None or self.cors or scope["method"] != "GET":
            return False
        start = time.perf_counter()
        match = self.reads.match(scope["path"])
        if match is None:
            return False
        ws = match.group("ws")
        if head_size(scope) > self.header_limit:
            return False
        hit = pages.cached_page(ws, scope["query_string"])
        if hit is not None:
            return self._answer_cached(scope, ws, hit, write, start, None)
        # The first of a herd: the page is built now, as the endpoint builds it.
        scope["path_params"] = match.groupdict()
        try:
            built = envelopes.read_now(self.relay, Request(scope))
        except Exception:  # the endpoint meets it again and answers it (a 503, a 500)
            return False
        if built is None:
            return False
        lines, body = built
        self._write_read(scope, lines, body, write, start, None)
        return True

    def _answer_cached(
        self,
        scope: Scope,
        ws: str,
        hit: tuple[Any, bytes | Buffers, bytes],
        write: Callable[[bytes, bytes | Buffers], None],
        start: float,
        client: str | None,
    ) -> bool:
        """A cached page's answer, if the access check admits the request."""
        if not self._admits(scope, ws):
            return False
        _, body, lines = hit
        self._write_read(scope, lines, body, write, start, client)
        return True

    def _write_read(
        self,
        scope: Scope,
        lines: bytes,
        body: bytes | Buffers,
        write: Callable[[bytes, bytes | Buffers], None],
        start: float,
        client: str | None,
    ) -> None:
        try:
            write(lines, body)
        finally:
            record(self.relay, scope, self.reads_path, 200, start, client)

    def keep(self, scope: Scope) -> KeptRead | None:
        """What the bytes of a read answer_now answered decide, kept for the same
        bytes again (`answer_kept`): the scope their parse gave, the workspace and
        the head's size."""
        match = self.reads.match(scope["path"])
        if match is None or self.cors or scope["method"] != "GET":
            return None
        if len(scope["headers"]) > KEPT_MAX_HEADERS:
            return None
        # Not the peer or the state of the connection it came from: each read's own
        # (`answer_kept` takes the peer; nothing on the path reads the state).
        kept = {**scope, "client": None, "state": {}}
        return KeptRead(kept, match.group("ws"), head_size(scope))

    def answer_kept(
        self,
        kept: KeptRead,
        peer: tuple[str, int] | None,
        write: Callable[[bytes, bytes | Buffers], None],
    ) -> bool:
        """answer_now for a read whose bytes are those `kept` was made from, from
        `peer`: the route, the method and the head are as they were; the header
        limit, the page cache and the access check are looked at now, the metrics
        sample and the log line (with this peer) follow. A page not in the cache
        is built by answer_now, from a copy of the scope with this peer."""
        pages = self.relay.pages
        if pages is None or kept.size > self.header_limit:
            return False
        scope = kept.scope
        hit = pages.cached_page(kept.ws, scope["query_string"])
        if hit is None:
            return self.answer_now({**scope, "client": peer, "state": {}}, write)
        start = time.perf_counter()
        client = self.relay.peer_address(scope, peer)
        return self._answer_cached(scope, kept.ws, hit, write, start, client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            for regex, route, by_method in self.hot:
                match = regex.match(path)
                if match is not None:
                    endpoint = by_method.get(scope["method"])
                    if endpoint is None:
                        break  # the router answers 405
                    scope["route"] = route
                    scope["endpoint"] = endpoint
                    scope["path_params"] = match.groupdict()
                    await self.lane(scope, receive, send)
                    return
        elif kind != "websocket":
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any route but the hot ones: through Starlette's middleware and router."""
        start = time.perf_counter()
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
                message["headers"] = add_security_headers(message.get("headers", ()), self.extra)
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and not status:
                status = 403
            await send(message)

        try:
            if head_size(scope) <= self.header_limit:
                await self.app(scope, receive, send_with_headers)
            elif scope["type"] == "http":
                await head_too_large(self.header_limit)(scope, receive, send_with_headers)
            else:
                status = 431
                await send({"type": "websocket.close", "code": 1009})
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            record(self.relay, scope, route, status, start)

    async def _serve_hot(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A hot route: scope["route"] and scope["endpoint"] are set by __call__."""
        start = time.perf_counter()
        status = 0
        unexpected: Exception | None = None
        pages = self.relay.pages
        if pages is not None and scope["endpoint"] is self.read:
            # A read the store has the answer for (built by get_envelopes, security
            # headers included): the header limit and the access check still run.
            ws = scope["path_params"]["ws"]
            hit = pages.cached_page(ws, scope["query_string"])
            if (
                hit is not None
                and head_size(scope) <= self.header_limit
                and self._admits(scope, ws)
            ):
                headers, body, _ = hit
                if type(body) is Buffers and not vectored(scope):
                    body = body.join()  # another ASGI server: one bytes body
                try:
                    # Behind CORSMiddleware, which adds headers (Starlette 1.x to a copy of
                    # the list; not relied on), the cached list is handed over as a copy.
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": list(headers) if self.cors else headers,
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                finally:
                    record(self.relay, scope, scope["route"].path, 200, start)
                return

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = add_security_headers(message.get("headers", ()), self.extra)
            await send(message)

        try:
            if head_size(scope) > self.header_limit:
                response = head_too_large(self.header_limit)
            else:
                request = Request(scope, receive, send)
                try:
                    response = await scope["endpoint"](request)
                except Exception as exc:
                    try:
                        response = self._handle(request, exc)
                    except Exception as bug:  # the app's 500 handler answers it
                        unexpected = bug
                        response = self.handlers[Exception](request, bug)
            if isinstance(response, live.SSEStream):
                # A stream sends its own head (or a JSON error if it cannot begin).
                try:
                    await response(scope, receive, send_with_headers)
                except Exception as bug:
                    if status:  # the stream had begun: uvicorn ends the connection
                        raise
                    unexpected = bug
                    await self.handlers[Exception](request, bug)(scope, receive, send_with_headers)
            else:
                # A whole answer: its headers are known; no wrapper around `send`.
                status = response.status_code
                add_security_headers(response.raw_headers, self.extra)
                await response(scope, receive, send)
        finally:
            record(self.relay, scope, scope["route"].path, status, start)
        if unexpected is not None:
            raise unexpected  # uvicorn logs it with its traceback, as for any route

    def _handle(self, request: Request, exc: Exception) -> Response:
        """What the app's exception handlers answer; the 500 handler is the caller's."""
        for kind in type(exc).__mro__:
            handler = self.handlers.get(kind)
            if handler is not None and kind is not Exception:
                return handler(request, exc)
        raise exc


async def _no_stack(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("Front.app is set when RelayApp builds its middleware stack")


class RelayApp(Starlette):
    """Starlette with Front in front of its middleware stack."""

    front: Front | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.front is None:
            return stack
        self.front.app = stack
        return self.front


def _relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    if exc.status == 429:
        request.app.state.relay.metrics.rejected(exc.code)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def _store_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreError)
    if store_error_status(exc) == 503:
        request.app.state.relay.metrics.unavailable(exc.code)
    return store_error_response(exc)


def _exception_group(request: Request, exc: Exception) -> Response:
    # A live stream's task group wraps a lone error (e.g. the store failing as the
    # stream starts): answer it as if raised alone. Anything else stays a 500.
    inner: BaseException = exc
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
    if isinstance(inner, StoreError):
        return _store_error(request, inner)
    if isinstance(inner, RelayError):
        return _relay_error(request, inner)
    raise exc


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = {
        404: "no such route",
        405: f"method {request.method} is not allowed here",
    }.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


def _disconnected(request: Request, exc: Exception) -> Response:
    # The client went away mid-body; nothing was stored. The answer is never read.
    return error_response(400, "client_disconnected", "the client closed the request")


def _server_error(request: Request, exc: Exception) -> Response:
    # uvicorn logs the traceback; the client only learns that it was our fault.
    return error_response(500, "internal_error", "the relay hit an unexpected error")


def build_relay(settings: Settings, store: Store | None = None) -> Relay:
    access = access_from_settings(settings)  # before the store: a bad file stops start-up first
    store = store or open_store(settings)
    relay = Relay(
        settings=settings,
        store=store,
        policy=access.policy(),
        access=access,
        # Stores fed by other processes (Redis) follow only locally watched workspaces.
        hub=Hub(store.watch, store.unwatch) if isinstance(store, WatchingStore) else Hub(),
        metrics=Metrics(publish_routes=PUBLISH_ROUTES),
        push_limiter=RateLimiter(settings.push_rate, settings.push_burst, "rate_limited", "pushes"),
        pair_limiter=RateLimiter(
            settings.pair_resolve_rate, 10, "pair_rate_limited", "pairing-code lookups"
        ),
        side_limiter=RateLimiter(
            settings.side_rate,
            settings.side_burst,
            "side_rate_limited",
            "keyring, presence and candidate writes",
        ),
        pair_create_limiter=RateLimiter(
            settings.pair_create_rate, 10, "pair_create_rate_limited", "pairing codes created"
        ),
        slots=StreamSlots(settings.max_sse, settings.max_sse_per_client),
        sampler=Sampler(settings.status_sample_secs),
        status_slots=StreamSlots(
            settings.max_status_streams,
            STATUS_STREAMS_PER_CLIENT,
            "status sample streams",
            "too_many_status_streams",
        ),
    )
    relay.store.set_listener(relay.hub.on_append)
    if settings.tls_cert:
        relay.tls = open_tls(settings)
        relay.metrics.add_collector(relay.tls.collect)
        # Every connection on a TLS port is TLS: HSTS, when asked for, on every answer.
        relay.extra_headers = hsts_headers(settings.hsts)
    if isinstance(store, PageCachingStore):
        relay.pages = store
    stats_store = store if isinstance(store, LocalStatsStore) else None
    budgeted = store if isinstance(store, BudgetedStore) else None
    if budgeted is not None:
        budgeted.set_listened(relay.hub.listened)

    def gauges() -> dict[str, tuple[str, float]]:
        stats = stats_store.stats_now() if stats_store is not None else None
        out: dict[str, tuple[str, float]] = {
            "hive_relay_live_streams": (
                "Live streams open (SSE, WebSocket, long-poll)",
                relay.slots.total,
            ),
            "hive_relay_live_streams_limit": (
                "HIVE_RELAY_MAX_SSE, the cap on live streams at once (0 = unlimited)",
                relay.slots.max_total,
            ),
            "hive_relay_uptime_seconds": ("Seconds since start", time.time() - relay.started),
            # With HIVE_RELAY_WORKERS > 1 each scrape is answered by one worker.
            "hive_relay_worker_pid": ("Process id of the worker that answered", os.getpid()),
            "hive_relay_workers": ("Worker processes configured", settings.workers),
        }
        if stats is not None:
            out["hive_relay_workspaces"] = ("Workspaces held", stats.workspaces)
            out["hive_relay_envelopes_retained"] = ("Envelopes retained", stats.envelopes)
            out["hive_relay_stored_bytes"] = ("Stored row bytes", stats.stored_bytes)
            out["hive_relay_pairings"] = ("Pairing codes held", stats.pairings)
        if relay.pages is not None:
            out["hive_relay_page_cache_bytes"] = (
                "Read answers cached until their workspace changes (on top of the budget)",
                relay.pages.page_cache_used,
            )
        if budgeted is not None:
            pool, side = budgeted.charged_now()
            out["hive_relay_budget_bytes"] = (
                "Envelopes and workspaces as charged to HIVE_RELAY_MAX_BYTES",
                pool,
            )
            out["hive_relay_budget_limit_bytes"] = (
                "HIVE_RELAY_MAX_BYTES, the memory budget the charged bytes count against",
                relay.settings.max_bytes,
            )
            out["hive_relay_side_budget_bytes"] = (
                "Keyring, presence and candidate entries as charged to their quarter of it",
                side,
            )
        return out

    relay.metrics.add_gauges(gauges)
    relay.slots.on_refuse = relay.metrics.unavailable
    relay.reloader = Reloader(settings.reload_interval)
    watch_access_files(relay, relay.reloader)
    relay.metrics.add_collector(relay.reloader.collect)
    relay.status_slots.on_refuse = relay.metrics.unavailable
    return relay


def watch_access_files(relay: Relay, reloader: Reloader) -> None:
    """Register the access files in force with the reloader: each replaces its part."""
    from dataclasses import replace

    settings = relay.settings
    access = relay.access
    assert access is not None
    items: list[tuple[str, str, Callable[[], Any], str]] = []
    if access.mode == "allowlist" and settings.access_tokens_file.strip():
        path = settings.access_tokens_file
        items.append(
            (
                "access_tokens_file",
                path,
                lambda: read_token_file(path, reloading=True),
                "file_tokens",
            )
        )
    if access.mode == "signed" and settings.token_pubkey_file.strip():
        keys_path = settings.token_pubkey_file
        items.append(
            ("token_pubkey_file", keys_path, lambda: read_key_file(keys_path), "file_keys")
        )
    if access.mode == "signed" and settings.revoked_tokens_file.strip():
        revoked_path = settings.revoked_tokens_file
        items.append(
            (
                "revoked_tokens_file",
                revoked_path,
                lambda: read_revocations(revoked_path),
                "revocations",
            )
        )
    for name, path, load, part in items:

        def apply(value: Any, part: str = part) -> str:
            assert relay.access is not None
            return relay.set_access(replace(relay.access, **{part: value}))

        reloader.watch(name, [path], load, apply)


def open_tls(settings: Settings) -> CertReloader:
    """The certificate pair of HIVE_RELAY_TLS_CERT/KEY, or SettingsError saying why not."""
    try:
        return CertReloader(settings.tls_cert, settings.tls_key)
    except CertificateError as exc:
        which = "HIVE_RELAY_TLS_KEY" if str(exc).startswith("key ") else "HIVE_RELAY_TLS_CERT"
        raise SettingsError(f"{which}: {exc}") from None


class _TlsChecks:
    """When to look at the certificate pair again: every `interval` seconds
    (HIVE_RELAY_RELOAD_INTERVAL; 0 leaves SIGHUP alone) and at once on SIGHUP."""

    def __init__(self, tls: CertReloader, interval: float) -> None:
        self.tls = tls
        self.interval = interval if interval > 0 else float("inf")
        self._wake = anyio.Event()

    def request(self) -> None:
        """SIGHUP: check now. Safe from a signal handler on the loop's thread."""
        self._wake.set()

    async def run(self) -> None:
        # A stat of two files each round; the load, when they changed, off the loop.
        while True:
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await anyio.to_thread.run_sync(self.tls.check)
            except Exception:  # never let a reload take the relay down; the old pair stays
                LOG.exception("TLS certificate check failed; still serving the previous pair")


def register_status_series(relay: Relay) -> None:
    """The status page's charts: relay-wide figures only, never a workspace's."""
    sampler = relay.sampler
    metrics = relay.metrics
    reads_route = f"{_WS}/envelopes"
    sampler.register_series(
        "appends", rate(lambda: metrics.appended.value), label="Appends", unit="/s"
    )
    sampler.register_series(
        "reads", rate(lambda: metrics.answered(reads_route)[0]), label="Reads", unit="/s"
    )
    sampler.register_series("streams", lambda: relay.slots.total, label="Live streams", unit="")
    store = relay.store
    if isinstance(store, BudgetedStore):
        budgeted = store
        sampler.register_series(
            "stored",
            lambda: budgeted.charged_now()[0],
            label="Memory budget",
            unit="bytes",
            limit=lambda: relay.settings.max_bytes,
        )
    elif isinstance(store, LocalStatsStore):
        counted = store
        sampler.register_series(
            "stored",
            lambda: counted.stats_now().stored_bytes,
            label="Stored body bytes",
            unit="bytes",
        )
    sampler.register_series(
        "client_errors", rate(lambda: metrics.answered(reads_route)[1]), label="4xx", unit="/s"
    )
    sampler.register_series(
        "server_errors", rate(lambda: metrics.answered(reads_route)[2]), label="5xx", unit="/s"
    )
    sampler.register_series(
        "publish_p99",
        window_quantile(lambda: metrics.publish.counts, BUCKETS, 0.99),
        label="Publish latency p99",
        unit="s",
    )
    journal = relay.journal
    if journal is not None:
        fsync = journal.stats.fsync_seconds
        sampler.register_series(
            "fsync_p99",
            window_quantile(lambda: fsync.counts, fsync.bounds, 0.99),
            label="Journal fsync p99",
            unit="s",
        )
    if relay.settings.store_kind != "memory":
        # A PING on the store's own pooled connection each sample: what every command
        # pays to reach Redis (network, Redis's queue, the pool), measured even when
        # no one publishes; publish latency already shows the append script's cost.
        async def ping() -> None:
            if not await store.ping():
                raise StoreError("Redis did not answer the PING")

        trip = RoundTrip(ping)
        sampler.add_probe(trip.probe)
        relay.metrics.add_collector(trip.collect)
        sampler.register_series("redis_rtt", trip.read, label="Redis round trip", unit="s")


async def _sweep_forever(relay: Relay) -> None:
    store = relay.store
    if not isinstance(store, SweepingStore):
        return
    steps = store.sweep_steps
    interval = min(SWEEP_INTERVAL, max(1.0, relay.settings.idle_workspace_secs / 4))
    while True:
        await anyio.sleep(interval)
        # A bounded step at a time, letting requests run in between.
        for _ in steps(relay.hub.listened):
            await anyio.lowlevel.checkpoint()


def _reload_on_sighup(*wanted: Callable[[], None]) -> None:
    """SIGHUP asks the reloader to read every watched file again, and direct TLS to
    look at its certificate pair (main thread only: an app served in a test's
    thread has no signals)."""
    import asyncio
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: [request() for request in wanted]
        )


def create_app(settings: Settings | None = None, store: Store | None = None) -> Starlette:
    settings = settings or Settings()
    relay = build_relay(settings, store)
    snapshots = None
    if settings.data_dir and settings.store_kind == "memory":
        from relay.store.journal import journal_metrics
        from relay.store.snapshot import JournalConfig, Snapshotter

        config = JournalConfig(
            mode=settings.fsync,
            repair=settings.journal_repair,
            segment_bytes=settings.journal_segment_bytes,
            max_bytes=settings.journal_max_bytes,
            max_age=settings.journal_max_age,
        )
        snapshots = Snapshotter(relay.store, settings.data_dir, settings.snapshot_interval, config)  # type: ignore[arg-type]
        snapshots.restore()
        journal = snapshots.journal
        if journal is not None:
            relay.journal = journal
            relay.metrics.add_collector(lambda: journal_metrics(journal))
    register_status_series(relay)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await relay.store.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sweep_forever, relay)
            on_sighup: list[Callable[[], None]] = []
            reloader = relay.reloader
            if reloader is not None:
                tg.start_soon(reloader.run)
                on_sighup.append(reloader.request)
            if relay.tls is not None:
                checks = _TlsChecks(relay.tls, settings.reload_interval)
                tg.start_soon(checks.run)
                on_sighup.append(checks.request)
            _reload_on_sighup(*on_sighup)
            tg.start_soon(relay.sampler.run)
            if snapshots is not None:
                tg.start_soon(snapshots.run)
            try:
                yield
            finally:
                relay.close_streams()
                tg.cancel_scope.cancel()
        if snapshots is not None:
            await snapshots.write_final()
        await relay.store.close()

    handlers: dict[Any, Any] = {
        RelayError: _relay_error,
        StoreError: _store_error,
        ExceptionGroup: _exception_group,
        HTTPException: _http_error,
        ClientDisconnect: _disconnected,
        Exception: _server_error,
    }
    cors: dict[str, Any] | None = None
    middleware = []
    if settings.cors_origin_list:
        # Bearer tokens, not cookies: credentials are never allowed.
        cors = {"allow_origins": list(settings.cors_origin_list), "max_age": 600, **cors_lists()}
        middleware.append(Middleware(CORSMiddleware, **cors))
    app = RelayApp(
        routes=[spec.route() for spec in ROUTES],
        middleware=middleware,
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.front = Front(
        relay,
        handlers,
        None if cors is None else functools.partial(CORSMiddleware, **cors),
    )
    app.router.redirect_slashes = False  # no redirect built from the client's Host header
    app.state.relay = relay
    app.state.snapshots = snapshots
    return app
