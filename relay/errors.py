"""One error type, one JSON error shape: {"error": "<code>", "message": "<sentence>"}."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
from starlette.responses import Response

from relay.store.base import StoreError, StoreFull

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_SECURITY_RAW = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

RawHeaders = list[tuple[bytes, bytes]]


def add_security_headers(
    headers: Iterable[tuple[bytes, bytes]], extra: RawHeaders | None = None
) -> RawHeaders:
    """The ASGI header list with the security headers added (in place for a list).

    Every answer the app sends gets them through here, once: a list that has
    them already is returned unchanged. `extra` are the relay's configured
    ones (Strict-Transport-Security over direct TLS).
    """
    raw = headers if isinstance(headers, list) else list(headers)
    if _SECURITY_RAW[0] not in raw:
        raw.extend(_SECURITY_RAW)
        if extra:
            raw.extend(extra)
    return raw


def hsts_headers(max_age: int) -> RawHeaders:
    """Strict-Transport-Security for a relay that serves TLS itself (HIVE_RELAY_HSTS).

    No includeSubDomains or preload: those bind every host of the domain, which
    is the domain owner's decision, not one service's.
    """
    return [(b"strict-transport-security", b"max-age=%d" % max_age)] if max_age > 0 else []


class RelayError(Exception):
    """Raised anywhere in request handling; becomes a JSON error response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["retry-after"] = str(max(1, retry_after))


def error_body(code: str, message: str) -> bytes:
    return msgspec.json.encode({"error": code, "message": message})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_body(code, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def store_error_status(exc: StoreError) -> int:
    """The HTTP status of a store's refusal: 413 for a bound that holds until data is
    removed (StoreFull), 503 for everything that clears by itself or by retrying."""
    return 413 if isinstance(exc, StoreFull) else 503


def store_error_response(exc: StoreError) -> Response:
    """A store's refusal as the JSON error answer: 413 for a bound, else 503 + Retry-After."""
    status = store_error_status(exc)
    headers = {"retry-after": str(exc.retry_after)} if exc.retry_after else None
    if status == 503 and headers is None:
        headers = {"retry-after": "1"}
    return error_response(status, exc.code, exc.message, headers)


def headers_too_large(limit: int) -> RelayError:
    """The 431 refusal of a request line and headers past HIVE_RELAY_HEADER_LIMIT.

    The app answers a head that arrived whole; relay/server.py answers one still
    arriving. Both send this code and message.
    """
    return RelayError(
        431, "headers_too_large", f"the request line and headers exceed {limit} bytes"
    )


def bad_request(code: str, message: str) -> RelayError:
    return RelayError(400, code, message)
