"""Workspace side channels (keyring, presence, candidates) and pairing codes.

Side-channel reads are capped like envelope pages: an answer holds at most
HIVE_RELAY_MAX_PAGE_BYTES of entries (and always at least one), so a small GET
never pins a keyring or presence map of hundreds of MiB in the connection's
output. When entries are left off the answer says `X-Relay-More: true` and
`X-Relay-Next` holds the query string for the next page. At the default caps a
workspace pages only when its side channel holds over 8 MiB, so a Hive device
that never pages still reads everything in the normal case; and the keyring's
first page is its newest blobs, the ones that carry the current key.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from relay.api.common import (
    authorize,
    check_json,
    int_param,
    parse_json,
    read_body,
    workspace_id,
)
from relay.errors import RelayError, bad_request
from relay.runtime import Relay
from relay.store.base import MAX_U64, PAIR_ALPHABET, PAIR_CODE_LEN

OK = b'{"ok":true}'
PAIR_TTL_DEFAULT = 600
PAIR_TTL_MIN = 30
PAIR_TTL_MAX = 3600
PAIR_PAYLOAD_MAX = 8192  # UTF-8 bytes of the payload string
# The whole request body: room for the largest payload written with JSON escapes
# (`\u0041` is six bytes for one), the ttl and white space. Nothing larger is read.
PAIR_BODY_MAX = 64 * 1024
MAX_DEVICE_ID = 200


class DeviceEntry(msgspec.Struct, forbid_unknown_fields=False):
    device_id: str
    data: msgspec.Raw = msgspec.Raw(b"null")


class PairRequest(msgspec.Struct, forbid_unknown_fields=False):
    payload: str
    # JSON has one number type: 30.0 is the integer 30 to most encoders (and to the
    # API document's "integer"), so a whole float is taken; 30.5 is refused below.
    ttl_secs: int | float | None = None


def _json(body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, media_type="application/json", headers=headers)


def _more(next_query: str) -> dict[str, str]:
    return {"x-relay-more": "true", "x-relay-next": next_query}


def keyring_page(blobs: list[bytes], before: int, max_bytes: int) -> int:
    """The index where the page of blobs ending just before `before` starts.

    Walks back from the newest blob the page may hold while the blobs (and
    their commas) fit in `max_bytes`; the page always holds at least one blob.
    """
    start = before
    size = 0
    while start > 0:
        size += len(blobs[start - 1]) + 1
        if size > max_bytes and start < before:
            break
        start -= 1
    return start


# A presence or candidate body is the entry's data plus its JSON frame: the device id
# (200 characters, up to 6 bytes each when \u-escaped) and the member names.
DEVICE_BODY_EXTRA = 2048


def _limit_side(relay: Relay, request: Request) -> None:
    """One per-client bucket for keyring, presence and candidate writes (429 past it)."""
    if relay.side_limiter.enabled:
        relay.side_limiter.take(relay.client(request.scope))


async def post_keyring(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    _limit_side(relay, request)
    # A blob is the whole body: refused while reading once it passes the entry limit.
    settings = relay.settings
    body = await read_body(request, min(settings.max_body_bytes, settings.max_side_bytes))
    check_json(body)
    await relay.store.keyring_append(ws, body)
    return _json(OK)


async def get_keyring(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    blobs = await relay.store.keyring_list(ws)
    # ?before=N (from a previous page's X-Relay-Next): the blobs older than the Nth.
    before = min(len(blobs), int_param(request, "before", len(blobs), 0, MAX_U64))
    start = keyring_page(blobs, before, relay.settings.max_page_bytes)
    body = b"[" + b",".join(blobs[start:before]) + b"]"
    return _json(body, _more(f"before={start}") if start > 0 else None)


async def post_device(request: Request, channel: str) -> Response:
    """Store one device's entry in `channel` ("presence" or "candidates", from the route)."""
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    _limit_side(relay, request)
    settings = relay.settings
    limit = min(settings.max_body_bytes, settings.max_side_bytes + DEVICE_BODY_EXTRA)
    body = await read_body(request, limit)
    entry = parse_json(body, DeviceEntry, "the body")
    if not 1 <= len(entry.device_id) <= MAX_DEVICE_ID:
        raise bad_request("invalid_device_id", f"device_id must be 1–{MAX_DEVICE_ID} characters")
    await relay.store.device_put(channel, ws, entry.device_id, bytes(entry.data))
    return _json(OK)


async def get_devices(request: Request, channel: str) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    entries = await relay.store.device_map(channel, ws)
    max_bytes = relay.settings.max_page_bytes
    after = request.query_params.get("after")
    if after is not None and not 1 <= len(after) <= MAX_DEVICE_ID:
        raise bad_request(
            "invalid_after", f"after must be a device_id of 1–{MAX_DEVICE_ID} characters"
        )
    parts = [msgspec.json.encode(device) + b":" + data for device, data in entries]
    if after is None and sum(map(len, parts)) + len(parts) <= max_bytes:
        return _json(b"{" + b",".join(parts) + b"}")
    # Paged: in device_id order, from just after ?after=<device_id> (from X-Relay-Next).
    order = sorted(range(len(entries)), key=lambda i: entries[i][0])
    if after is not None:
        order = [i for i in order if entries[i][0] > after]
    page: list[bytes] = []
    size = 0
    for n, i in enumerate(order):
        size += len(parts[i]) + 1
        if size > max_bytes and page:
            last = entries[order[n - 1]][0]
            return _json(b"{" + b",".join(page) + b"}", _more("after=" + quote(last, safe="")))
        page.append(parts[i])
    return _json(b"{" + b",".join(page) + b"}")


async def post_pair(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    authorize(relay, request, None)
    # Charged before the body is read, so a flood of creates, refused or not, costs
    # the relay a bucket lookup each.
    relay.pair_create_limiter.take(relay.client(request.scope))
    body = await read_body(request, min(PAIR_BODY_MAX, relay.settings.max_body_bytes))
    pair = parse_json(body, PairRequest, "the body")
    if not pair.payload.strip():
        raise bad_request("empty_payload", "payload must hold something besides white space")
    if len(pair.payload) > PAIR_PAYLOAD_MAX or (
        not pair.payload.isascii()
        and len(pair.payload.encode("utf-8", "surrogatepass")) > PAIR_PAYLOAD_MAX
    ):
        raise bad_request(
            "payload_too_long", f"payload is longer than {PAIR_PAYLOAD_MAX} bytes in UTF-8"
        )
    ttl_asked = pair.ttl_secs
    if isinstance(ttl_asked, float):
        if not ttl_asked.is_integer():
            raise bad_request("invalid_body", "ttl_secs must be a whole number of seconds")
        ttl_asked = int(ttl_asked)
    ttl = PAIR_TTL_DEFAULT if ttl_asked is None else ttl_asked
    ttl = min(PAIR_TTL_MAX, max(PAIR_TTL_MIN, ttl))
    code = await relay.store.pair_create(pair.payload, ttl)
    return _json(msgspec.json.encode({"code": code, "expires_in": ttl}))


_SEPARATORS = re.compile(r"[\s\-_.:/]+")
# Crockford-style reading: letters that are not in the alphabet but look like digits.
_LOOKALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})


def normalize_code(text: str) -> str | None:
    code = _SEPARATORS.sub("", text).upper().translate(_LOOKALIKES)
    if len(code) != PAIR_CODE_LEN or any(c not in PAIR_ALPHABET for c in code):
        return None
    return code


async def get_pair(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    authorize(relay, request, None)
    # Every attempt costs, found or not, so the code space cannot be walked.
    relay.pair_limiter.take(relay.client(request.scope))
    code = normalize_code(request.path_params["code"])
    payload = await relay.store.pair_resolve(code) if code else None
    if payload is None:
        raise RelayError(404, "not_found", "no pairing code like that, or it has expired")
    return _json(msgspec.json.encode({"payload": payload}))
