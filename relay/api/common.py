"""What every workspace handler does first: validate the id, authorize, read the body."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.types import Scope

from relay.access import Denied, Grant, bearer_token
from relay.errors import RelayError, bad_request

if TYPE_CHECKING:
    from relay.runtime import Relay

MAX_WORKSPACE_ID = 200
# A workspace id: 1–MAX_WORKSPACE_ID of these characters (relay/openapi.py states it too).
WORKSPACE_ID_PATTERN = r"[A-Za-z0-9._~:@-]{1,%d}" % MAX_WORKSPACE_ID
_WS_RE = re.compile(WORKSPACE_ID_PATTERN)
T = TypeVar("T")


def workspace_id(request: Request) -> str:
    ws: str = request.path_params["ws"]
    if not _WS_RE.fullmatch(ws) or ws in (".", ".."):
        raise bad_request(
            "invalid_workspace",
            f"the workspace id must be 1–{MAX_WORKSPACE_ID} characters from "
            "A–Z a–z 0–9 . _ ~ : @ - (and not . or ..)",
        )
    return ws


def header(request: Request, name: bytes) -> str | None:
    """One request header (name in lower case), or None.

    Starlette's `request.headers.get` scans the header list and raises and
    catches a KeyError for every absent header; the hot handlers ask for three
    that are usually absent. A dict of the raw headers, made once per request,
    answers each in one lookup.
    """
    return scope_header(request.scope, name)


def scope_header(scope: Scope, name: bytes) -> str | None:
    """`header` for code that has the ASGI scope and no Request (the front lane)."""
    raw = scope.get("relay.headers")
    if raw is None:
        raw = scope["relay.headers"] = dict(scope["headers"])
    value = raw.get(name)
    return None if value is None else value.decode("latin-1")


def authorize(relay: Relay, request: Request, ws: str | None) -> Grant:
    """The caller's grant, or a 401/403 RelayError. `ws=None` checks the token only."""
    return authorize_scope(relay, request.scope, ws)


def authorize_scope(relay: Relay, scope: Scope, ws: str | None) -> Grant:
    """`authorize` from the ASGI scope: the one access check, for the endpoints and
    for the front lane's cached reads alike."""
    try:
        grant = relay.policy.authenticate(bearer_token(scope_header(scope, b"authorization")))
    except Denied as exc:
        raise denied_error(exc) from None
    if ws is not None and not grant.allows(ws):
        raise RelayError(403, "forbidden", "the bearer token does not grant this workspace")
    return grant


def denied_error(denied: Denied) -> RelayError:
    headers = {"www-authenticate": "Bearer"} if denied.status == 401 else None
    return RelayError(denied.status, denied.code, denied.message, headers=headers)


def too_large(limit: int) -> RelayError:
    return RelayError(413, "payload_too_large", f"the request body exceeds {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes before buffering them.

    Content-Length, when sent, is checked first; a chunked body is counted as
    it arrives and refused as soon as it passes the limit. Each route passes its
    own limit, so a body never costs more than the route could accept. Pieces
    after the first go into one buffer: a body trickled a byte at a time would
    otherwise hold a 33-byte object per byte.
    """
    declared = header(request, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise too_large(limit)
    first = b""
    rest: bytearray | None = None
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            if not first:
                first = chunk
            elif rest is None:
                rest = bytearray(first)
                rest += chunk
            else:
                rest += chunk
        if not message.get("more_body", False):
            break
    return first if rest is None else bytes(rest)


def parse_json(body: bytes, kind: type[T], what: str = "the body") -> T:
    """Decode exactly one valid UTF-8 JSON value as `kind`, in one pass.

    Syntax errors are `400 invalid_json`; a valid value of the wrong shape is
    `400 invalid_body` (callers may catch ShapeError to say more).
    """
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request("invalid_json", f"{what} is not valid UTF-8") from None
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ShapeError("invalid_body", f"{what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request("invalid_json", f"{what} is not one valid JSON value: {exc}") from None
    except RecursionError:
        raise bad_request("invalid_json", f"{what} is nested too deeply") from None


class ShapeError(RelayError):
    """Valid JSON of the wrong shape (400 invalid_body unless a caller says more)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(400, code, message)


def check_json(body: bytes, what: str = "the body") -> None:
    """Reject anything but exactly one valid UTF-8 JSON value."""
    parse_json(body, msgspec.Raw, what)


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 20 or not low <= int(text) <= high:
        raise bad_request(f"invalid_{name}", f"{name} must be a whole number from {low} to {high}")
    return int(text)
