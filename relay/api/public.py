"""Public routes: health probe, metrics, the OpenAPI document (the status page is
in relay/api/status.py)."""

from __future__ import annotations

import hashlib
import hmac

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from relay.access import bearer_token
from relay.errors import RelayError
from relay.openapi import openapi_document
from relay.runtime import Relay
from relay.store.base import StoreError

HEALTH_TIMEOUT = 2.0


async def store_healthy(relay: Relay) -> bool:
    with anyio.move_on_after(HEALTH_TIMEOUT):
        try:
            return await relay.store.ping()
        except (StoreError, OSError):
            return False
    return False


async def health(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    if await store_healthy(relay):
        return Response(b"ok", media_type="text/plain")
    return Response(
        b"store unavailable",
        status_code=503,
        media_type="text/plain",
        headers={"retry-after": "5"},
    )


async def metrics(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    expected = relay.settings.metrics_token
    if expected:
        given = bearer_token(request.headers.get("authorization")) or ""
        if not hmac.compare_digest(
            hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
            hashlib.sha256(expected.encode()).digest(),
        ):
            raise RelayError(
                401,
                "unauthorized",
                "a valid metrics bearer token is required",
                headers={"www-authenticate": "Bearer"},
            )
    body = generate_latest(relay.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


_OPENAPI: bytes | None = None


async def openapi(request: Request) -> Response:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = msgspec.json.encode(openapi_document())
    return Response(_OPENAPI, media_type="application/json")
