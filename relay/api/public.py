"""Public routes: health probe, status page, metrics, the OpenAPI document."""

from __future__ import annotations

import hashlib
import hmac
import html
import time

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from relay import __version__
from relay.access import bearer_token
from relay.errors import RelayError
from relay.openapi import openapi_document
from relay.runtime import Relay
from relay.store.base import StoreError

HEALTH_TIMEOUT = 2.0
STATUS_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


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


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    return " ".join([*parts, f"{hours}h", f"{minutes}m", f"{s}s"])


def _transport(relay: Relay) -> str:
    tls = relay.tls
    if tls is None:
        return "plain HTTP (TLS, if any, ends at a proxy in front)"
    return f"TLS (served by the relay): {tls.certificate.describe()}"


async def status_page(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    stats = await relay.store.stats()
    rows = [
        ("Version", __version__),
        ("Uptime", _uptime(time.time() - relay.started)),
        ("Store", relay.settings.store.split("://", 1)[0]),
        ("Access", relay.policy.name),
        ("Transport", _transport(relay)),
        (
            "Workers",
            f"{relay.settings.workers} (this page from one of them)"
            if relay.settings.workers > 1
            else "1",
        ),
        ("Workspaces", f"{stats.workspaces:,}"),
        ("Envelopes retained", f"{stats.envelopes:,}"),
        ("Stored body bytes", f"{stats.stored_bytes:,}"),
        ("Live streams", f"{relay.slots.total:,}"),
    ]
    journal = relay.journal
    if journal is not None:
        fs = journal.stats.fsync_seconds
        per = journal.stats.records_per_fsync
        rows += [
            ("Durability", f"journal, fsync {journal.mode}"),
            ("Journal", "failed: writes refused until restart" if journal.failed else "ok"),
            ("Journal size", f"{journal.total_bytes:,} bytes"),
            (
                "fsync latency p50 / p99",
                f"{fs.quantile(0.5) * 1000:.2f} ms / {fs.quantile(0.99) * 1000:.2f} ms",
            ),
            ("Records per fsync (mean)", f"{per.total / per.n:.1f}" if per.n else "–"),
        ]
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hive-relay</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#222}}
h1{{font-size:1.6rem;margin-bottom:.2rem}} p{{color:#555;margin-top:0}}
table{{border-collapse:collapse;width:100%}} th,td{{text-align:left;padding:.45rem .6rem;
border-bottom:1px solid #ddd}} th{{width:45%;font-weight:600}}
</style></head>
<body><h1>hive-relay</h1>
<p>A content-blind relay for end-to-end-encrypted event envelopes. It stores ciphertext only.</p>
<table>
{table}
</table>
<p><a href="/v1/health">health</a> · <a href="/openapi.json">API</a></p>
</body></html>
"""
    return HTMLResponse(page, headers={"content-security-policy": STATUS_CSP})


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
