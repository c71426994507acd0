"""Workspace side channels (keyring, presence, candidates) and pairing codes."""

from __future__ import annotations

import re

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from relay.api.common import authorize, check_json, parse_json, read_body, workspace_id
from relay.errors import RelayError, bad_request
from relay.runtime import Relay
from relay.store.memory import PAIR_ALPHABET, PAIR_CODE_LEN

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
    ttl_secs: int | None = None


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


async def post_keyring(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    body = await read_body(request, relay.settings.max_body_bytes)
    check_json(body)
    await relay.store.keyring_append(ws, body)
    return _json(OK)


async def get_keyring(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    blobs = await relay.store.keyring_list(ws)
    return _json(b"[" + b",".join(blobs) + b"]")


def _channel(request: Request) -> str:
    # The route path ends in the channel name.
    return request.url.path.rsplit("/", 1)[-1]


async def post_device(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    body = await read_body(request, relay.settings.max_body_bytes)
    entry = parse_json(body, DeviceEntry, "the body")
    if not 1 <= len(entry.device_id) <= MAX_DEVICE_ID:
        raise bad_request("invalid_device_id", f"device_id must be 1–{MAX_DEVICE_ID} characters")
    await relay.store.device_put(_channel(request), ws, entry.device_id, bytes(entry.data))
    return _json(OK)


async def get_devices(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    ws = workspace_id(request)
    authorize(relay, request, ws)
    entries = await relay.store.device_map(_channel(request), ws)
    parts = [msgspec.json.encode(device) + b":" + data for device, data in entries]
    return _json(b"{" + b",".join(parts) + b"}")


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
    ttl = PAIR_TTL_DEFAULT if pair.ttl_secs is None else pair.ttl_secs
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
