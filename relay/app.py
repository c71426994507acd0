"""create_app(settings) → the Starlette app. The lifespan owns the store, the
hub, the house-keeping sweep and the snapshot writer."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import logs
from relay.access import policy_from_settings
from relay.api import envelopes, live, public, side
from relay.errors import (
    SECURITY_HEADERS,
    RelayError,
    error_response,
    headers_too_large,
    store_error_response,
)
from relay.hub import Hub
from relay.limits import RateLimiter, StreamSlots
from relay.metrics import Metrics
from relay.runtime import Relay
from relay.settings import Settings
from relay.store import open_store
from relay.store.base import Store, StoreError

LOG = logging.getLogger("relay")
SWEEP_INTERVAL = 30.0
_SECURITY = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
LIVE_ROUTES = ("/v1/workspaces/{ws}/events", "/v1/workspaces/{ws}/ws")


def _secure(start: Message) -> None:
    """Add the security headers to a response-start message."""
    start["headers"] = [*start.get("headers", ()), *_SECURITY]


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


def record(relay: Relay, scope: Scope, route: str, status: int, start: float) -> None:
    """The metrics sample and access-log line that end every request."""
    method = scope.get("method", "WS")
    duration = time.perf_counter() - start
    relay.metrics.observe(
        route,
        method,
        status or 500,
        duration,
        timed=route not in LIVE_ROUTES and b"wait=" not in scope.get("query_string", b""),
    )
    if relay.settings.access_log:
        logs.access(method, route, status or 500, duration, relay.address(scope))


class RequestLog:
    """One log line and one metrics sample per request; security headers on every answer.

    Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched.
    """

    def __init__(self, app: ASGIApp, relay: Relay) -> None:
        self.app = app
        self.relay = relay
        self.header_limit = relay.settings.header_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                _secure(message)
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and not status:
                status = 403
            elif kind == "websocket.http.response.start":
                status = message["status"]
                _secure(message)
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
            route_obj = scope.get("route")
            route = getattr(route_obj, "path", None) or "unmatched"
            record(self.relay, scope, route, status, start)


class HotPath:
    """Serve the hottest routes (push and read envelopes, SSE) without the router.

    Starlette's router tries routes in order and wraps each endpoint in two
    exception-handling layers and a fresh Request; on the publish path that was
    a fifth of the relay's own time, and an idle SSE stream held those layers'
    frames (about 3 KiB) for its whole life (docs/benchmarks.md). Errors are
    mapped by the app's own handlers.

    Where it sits depends on CORS. With CORS off (the default) it is the
    outermost layer (`outermost=True`): for these routes it also does what
    RequestLog and Starlette's ServerErrorMiddleware do (security headers, the
    header limit, the metrics sample and log line, a JSON 500 for a bug),
    without their two wrappers around every `send`. With CORS on it sits
    innermost, after CORS, and those layers run as for any route.
    """

    PATH = re.compile(r"/v1/workspaces/([^/]+)/(envelopes|events)")

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, Route],
        handlers: dict[Any, Any],
        relay: Relay | None = None,
        outermost: bool = False,
    ) -> None:
        self.app = app
        self.routes = routes
        self.handlers = handlers
        self.relay = relay
        self.outermost = outermost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "GET", "HEAD"):
            match = self.PATH.fullmatch(scope["path"])
            if match is not None and (match.group(2) == "envelopes" or scope["method"] != "POST"):
                route = self.routes[match.group(2)]
                if self.outermost:
                    await self._serve_whole(scope, receive, send, route, match.group(1))
                    return
                scope["route"] = route
                scope["path_params"] = {"ws": match.group(1)}
                request = Request(scope, receive, send)
                try:
                    response = await route.endpoint(request)
                except Exception as exc:  # the same mapping the app's handlers apply
                    response = self._handle(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve_whole(
        self, scope: Scope, receive: Receive, send: Send, route: Route, ws: str
    ) -> None:
        relay = self.relay
        assert relay is not None
        start = time.perf_counter()
        status = 0
        scope["route"] = route
        scope["path_params"] = {"ws": ws}
        unexpected: Exception | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                _secure(message)
            await send(message)

        try:
            if head_size(scope) > relay.settings.header_limit:
                response = head_too_large(relay.settings.header_limit)
            else:
                request = Request(scope, receive, send)
                try:
                    response = await route.endpoint(request)
                except Exception as exc:
                    try:
                        response = self._handle(request, exc)
                    except Exception as bug:  # what ServerErrorMiddleware would answer
                        unexpected = bug
                        response = _server_error(request, bug)
            if isinstance(response, live.SSEStream):
                # A stream sends its own head (or a JSON error if the store fails first).
                try:
                    await response(scope, receive, send_with_headers)
                except Exception as bug:
                    if status:  # the stream had begun: uvicorn ends the connection
                        raise
                    unexpected, status = bug, 500
                    await _server_error(request, bug)(scope, receive, send)
            else:
                # A whole answer: its headers are known; no wrapper around `send`.
                status = response.status_code
                with_security_headers(response)
                await response(scope, receive, send)
        finally:
            record(relay, scope, route.path, status, start)
        if unexpected is not None:
            raise unexpected  # uvicorn logs it with its traceback, as for any route

    def _handle(self, request: Request, exc: Exception) -> Response:
        for kind in type(exc).__mro__:
            handler = self.handlers.get(kind)
            if handler is not None and kind is not Exception:
                response: Response = handler(request, exc)
                return response
        raise exc


def with_security_headers(response: Response) -> None:
    raw = response.raw_headers
    if _SECURITY[0] not in raw:
        raw.extend(_SECURITY)


class RelayApp(Starlette):
    """Starlette with the hot routes' lane in front of its middleware stack."""

    front: HotPath | None = None

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
    # Sent by Starlette's outermost middleware, past RequestLog: add the security headers.
    return error_response(
        500, "internal_error", "the relay hit an unexpected error", SECURITY_HEADERS
    )


def build_relay(settings: Settings, store: Store | None = None) -> Relay:
    store = store or open_store(settings)
    relay = Relay(
        settings=settings,
        store=store,
        policy=policy_from_settings(settings),
        # Stores fed by other processes (Redis) follow only locally watched workspaces.
        hub=Hub(getattr(store, "watch", None), getattr(store, "unwatch", None)),
        metrics=Metrics(),
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
    )
    relay.store.set_listener(relay.hub.on_append)
    set_listened = getattr(relay.store, "set_listened", None)
    if set_listened is not None:
        set_listened(relay.hub.listened)

    def gauges() -> dict[str, tuple[str, float]]:
        stats = relay.store.stats_now() if hasattr(relay.store, "stats_now") else None
        out: dict[str, tuple[str, float]] = {
            "hive_relay_live_streams": (
                "Live streams open (SSE, WebSocket, long-poll)",
                relay.slots.total,
            ),
            "hive_relay_uptime_seconds": ("Seconds since start", time.time() - relay.started),
        }
        if stats is not None:
            out["hive_relay_workspaces"] = ("Workspaces held", stats.workspaces)
            out["hive_relay_envelopes_retained"] = ("Envelopes retained", stats.envelopes)
            out["hive_relay_stored_bytes"] = ("Stored row bytes", stats.stored_bytes)
            out["hive_relay_pairings"] = ("Pairing codes held", stats.pairings)
        charged = getattr(relay.store, "charged_now", None)
        if charged is not None:
            pool, side = charged()
            out["hive_relay_budget_bytes"] = (
                "Envelopes and workspaces as charged to HIVE_RELAY_MAX_BYTES",
                pool,
            )
            out["hive_relay_side_budget_bytes"] = (
                "Keyring, presence and candidate entries as charged to their quarter of it",
                side,
            )
        return out

    relay.metrics.add_gauges(gauges)
    return relay


async def _sweep_forever(relay: Relay) -> None:
    steps = getattr(relay.store, "sweep_steps", None)
    if steps is None:
        return
    interval = min(SWEEP_INTERVAL, max(1.0, relay.settings.idle_workspace_secs / 4))
    while True:
        await anyio.sleep(interval)
        # A bounded step at a time, letting requests run in between.
        for _ in steps(relay.hub.listened):
            await anyio.lowlevel.checkpoint()


Endpoint = Callable[[Request], Awaitable[Response]]


def _get_post(path: str, get: Endpoint, post: Endpoint) -> Route:
    """One route per path, so a 405 answer's Allow header names every method."""

    async def endpoint(request: Request) -> Response:
        return await (post if request.method == "POST" else get)(request)

    return Route(path, endpoint, methods=["GET", "POST"], name=post.__name__)


def create_app(settings: Settings | None = None, store: Store | None = None) -> Starlette:
    settings = settings or Settings()
    relay = build_relay(settings, store)
    snapshots = None
    if settings.data_dir and settings.store.startswith("memory"):
        from relay.store.snapshot import Snapshotter

        snapshots = Snapshotter(relay.store, settings.data_dir, settings.snapshot_interval)  # type: ignore[arg-type]
        snapshots.restore()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await relay.store.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sweep_forever, relay)
            if snapshots is not None:
                tg.start_soon(snapshots.run)
            try:
                yield
            finally:
                relay.hub.close_all()
                tg.cancel_scope.cancel()
        if snapshots is not None:
            await snapshots.write_final()
        await relay.store.close()

    ws_path = "/v1/workspaces/{ws}"
    # The hot routes first: Starlette tries routes in order.
    routes = [
        _get_post(f"{ws_path}/envelopes", envelopes.get_envelopes, envelopes.post_envelope),
        Route(f"{ws_path}/envelopes/batch", envelopes.post_batch, methods=["POST"]),
        Route(f"{ws_path}/events", live.events, methods=["GET"]),
        WebSocketRoute(f"{ws_path}/ws", live.websocket),
        _get_post(f"{ws_path}/keyring", side.get_keyring, side.post_keyring),
        _get_post(f"{ws_path}/presence", side.get_devices, side.post_device),
        _get_post(f"{ws_path}/candidates", side.get_devices, side.post_device),
        Route("/v1/pair", side.post_pair, methods=["POST"]),
        Route("/v1/pair/{code}", side.get_pair, methods=["GET"]),
        Route("/v1/health", public.health, methods=["GET", "HEAD"]),
        Route("/", public.status_page, methods=["GET"]),
        Route("/metrics", public.metrics, methods=["GET"]),
        Route("/openapi.json", public.openapi, methods=["GET"]),
    ]
    middleware = [Middleware(RequestLog, relay=relay)]
    if settings.cors_origin_list:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origin_list),
                allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Idempotency-Key",
                    "Idempotency-Keys",
                    "X-Hive-Event-Id",
                    "Last-Event-ID",
                ],
                expose_headers=[
                    "X-Relay-Head",
                    "X-Relay-Oldest",
                    "X-Relay-Epoch",
                    "X-Relay-Gap",
                    "X-Relay-More",
                    "X-Relay-Next",
                    "Retry-After",
                ],
                max_age=600,
            )
        )
    handlers: dict[Any, Any] = {
        RelayError: _relay_error,
        StoreError: _store_error,
        ExceptionGroup: _exception_group,
        HTTPException: _http_error,
        ClientDisconnect: _disconnected,
        Exception: _server_error,
    }
    hot = {r.path.rsplit("/", 1)[-1]: r for r in routes[:3] if isinstance(r, Route)}
    assert set(hot) >= {"envelopes", "events"}
    if settings.cors_origin_list:
        middleware.append(Middleware(HotPath, routes=hot, handlers=handlers))
    app = RelayApp(
        routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan
    )
    if not settings.cors_origin_list:
        # Its `app` becomes Starlette's stack when RelayApp builds it.
        app.front = HotPath(app, hot, handlers, relay=relay, outermost=True)
    app.router.redirect_slashes = False  # no redirect built from the client's Host header
    app.state.relay = relay
    app.state.snapshots = snapshots
    return app
