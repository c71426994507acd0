"""The OpenAPI 3.1 document of the whole API, served at /openapi.json.

Every bound it states is imported from the module that enforces it, and the
component schemas are msgspec's JSON Schema of the request and response types
below, so the document cannot drift from the code. The prose follows
docs/protocol.md; tests/test_public.py checks that every route the app serves is
described here and the other way round, and tests/test_fuzz.py fuzzes the relay
against it with schemathesis.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from relay import __version__
from relay.api.common import WORKSPACE_ID_PATTERN
from relay.api.envelopes import MAX_BATCH, MAX_KEY_LEN, MAX_LIMIT, MAX_WAIT
from relay.api.side import MAX_DEVICE_ID, PAIR_PAYLOAD_MAX, PAIR_TTL_MAX, PAIR_TTL_MIN
from relay.store.base import MAX_U64, PAIR_ALPHABET, PAIR_CODE_LEN

WS_PATTERN = f"^{WORKSPACE_ID_PATTERN}$"


def uint_pattern(high: int) -> str:
    """A regex for the decimal whole numbers 0..high, leading zeros allowed."""
    digits = str(high)
    parts = [f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    # Numbers with as many digits as `high`: equal on a prefix, then smaller at one digit.
    for i, d in enumerate(digits):
        rest = len(digits) - i - 1
        low = "1" if i == 0 and len(digits) > 1 else "0"
        if int(d) > int(low):
            top = int(d) - 1
            span = low if top == int(low) else f"[{low}-{top}]"
            parts.append(digits[:i] + span + (f"[0-9]{{{rest}}}" if rest else ""))
    parts.append(digits)
    return "0*(?:" + "|".join(parts) + ")"


# Python's str.strip() whitespace within Latin-1 (how header values are read).
_SPACE = r"[\t-\r\x1c-\x20\x85\xa0]*"
# Every character str.strip() removes (str.isspace()), Latin-1 or not.
_UNICODE_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_ERROR_CODES = {
    400: "invalid_workspace, invalid_json, invalid_body, invalid_after, invalid_limit, "
    "invalid_wait, invalid_batch, invalid_idempotency_key, invalid_device_id, "
    "invalid_content_length, invalid_bodies, invalid_last_event_id, invalid_before, "
    "empty_payload, payload_too_long",
    401: "unauthorized, token_revoked (with WWW-Authenticate: Bearer)",
    403: "forbidden: the token does not grant this workspace",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large, too_large, keyring_full, too_many_devices, relay_full",
    429: "rate_limited, side_rate_limited, pair_rate_limited, pair_create_rate_limited "
    "(with Retry-After)",
    503: "store_unavailable, relay_full (Redis store), too_many_pairings, shutting_down, "
    "too_many_streams, too_many_streams_for_client (with Retry-After)",
}


def _error(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": _ERROR_CODES[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if status in (429, 503):
        out["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _error(s) for s in statuses}


def _json(schema: dict[str, Any], description: str = "OK", headers: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = headers
    return out


_WS = {
    "name": "ws",
    "in": "path",
    "required": True,
    "description": "Workspace (room) id",
    "schema": {"type": "string", "pattern": WS_PATTERN},
}
_AFTER = {
    "name": "after",
    "in": "query",
    "description": "Cursor: return rows with a larger seq (default 0)",
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_U64},
}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "description": "At most this many rows",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
}
_WAIT = {
    "name": "wait",
    "in": "query",
    "description": "Long-poll: hold up to this many seconds when no row is past the cursor",
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT},
}
_READ_HEADERS = {
    "X-Relay-Head": {"$ref": "#/components/headers/X-Relay-Head"},
    "X-Relay-Oldest": {"$ref": "#/components/headers/X-Relay-Oldest"},
    "X-Relay-Epoch": {"$ref": "#/components/headers/X-Relay-Epoch"},
    "X-Relay-Gap": {"$ref": "#/components/headers/X-Relay-Gap"},
}
# Idempotency-Keys: entries of up to MAX_KEY_LEN visible ASCII characters but the
# comma, with optional spaces or tabs around each (an empty entry means sha256 of its
# element).
_KEY_ENTRY = r"[ \t]*[!-+\--~]{0,%d}[ \t]*" % MAX_KEY_LEN
_KEY_PATTERN = f"^[!-~]{{1,{MAX_KEY_LEN}}}$"
_KEYS_PATTERN = f"^{_KEY_ENTRY}(,{_KEY_ENTRY})*$"
_IDEMPOTENCY = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "description": f"Dedup key (1–{MAX_KEY_LEN} visible ASCII characters, ! to ~); "
        "else X-Hive-Event-Id; else sha256(body)",
        "schema": {"type": "string", "pattern": _KEY_PATTERN},
    },
    {
        "name": "X-Hive-Event-Id",
        "in": "header",
        "description": "Dedup key used by Hive devices when Idempotency-Key is absent "
        "(the same rule)",
        "schema": {"type": "string", "pattern": _KEY_PATTERN},
    },
]
_ANY_JSON: dict[str, Any] = {"description": "Any JSON value (opaque to the relay)"}
_OK = _json({"$ref": "#/components/schemas/Ok"})
_DEVICE_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DeviceEntry"}}},
}
# Side-channel reads are paged at HIVE_RELAY_MAX_PAGE_BYTES: both headers or neither.
_PAGE_HEADERS = {
    "X-Relay-More": {"$ref": "#/components/headers/X-Relay-More"},
    "X-Relay-Next": {"$ref": "#/components/headers/X-Relay-Next"},
}
_DEVICE_MAP = _json(
    {"type": "object", "additionalProperties": _ANY_JSON},
    "Device id → its latest data (one page, in device_id order when paged)",
    _PAGE_HEADERS,
)
_DEVICE_AFTER = {
    "name": "after",
    "in": "query",
    "description": "Page cursor from X-Relay-Next: the entries whose device_id sorts "
    f"after this one (1–{MAX_DEVICE_ID} characters); invalid_after otherwise",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_DEVICE_ID},
}
_KEYRING_BEFORE = {
    "name": "before",
    "in": "query",
    "description": "Page cursor from X-Relay-Next: the blobs older than the blob at this "
    "index (default: from the newest); invalid_before otherwise",
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_U64},
}
# One Server-Sent Event as a client parses it (comments such as `: connected` and
# `: keep-alive` are not events). As in OpenAPI 3.1 practice, the schema of a
# text/event-stream response describes each event of the stream.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {
            "description": "`message` (the default), or `gap` when the cursor is below "
            "dropped history",
            "enum": ["message", "gap"],
        },
        "id": {
            "description": "The row's seq (bodies=1): a resume cursor for Last-Event-ID",
            "type": "string",
            "pattern": "^[0-9]{1,20}$",
        },
        "retry": {"type": "integer"},
        "data": {
            "description": 'A nudge `{"seq":N}`, a whole row `{"seq":N,"body":...}` '
            '(bodies=1), or, for `event: gap`, `{"oldest":N}`',
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/Nudge"},
                    {"$ref": "#/components/schemas/Row"},
                    {"$ref": "#/components/schemas/Gap"},
                ]
            },
        },
    },
}
_FIGURE = {"type": ["number", "null"], "description": "null: a gap (nothing to measure)"}
_SAMPLE_VALUES = {"type": "object", "additionalProperties": _FIGURE}
_SAMPLES_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "description": "`buffer`: every sample held (sent first, and again after a "
            "reader fell behind); `sample`: the newest one",
            "enum": ["buffer", "sample"],
        },
        "retry": {"type": "integer"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["interval", "capacity", "count", "series", "t", "values"],
                        "properties": {
                            "interval": {"type": "number"},
                            "capacity": {"type": "integer"},
                            "count": {"type": "integer"},
                            "series": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "label", "unit", "limit"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "label": {"type": "string"},
                                        "unit": {"enum": ["/s", "s", "bytes", ""]},
                                        "limit": _FIGURE,
                                    },
                                },
                            },
                            "t": {"type": "array", "items": {"type": "number"}},
                            "values": {
                                "type": "object",
                                "additionalProperties": {"type": "array", "items": _FIGURE},
                            },
                        },
                    },
                    {
                        "type": "object",
                        "required": ["count", "t", "values"],
                        "properties": {
                            "count": {"type": "integer"},
                            "t": {"type": "number"},
                            "values": _SAMPLE_VALUES,
                        },
                    },
                ]
            },
        },
    },
}
_SSE = {
    "description": "text/event-stream: `: connected`, then one event per appended envelope "
    "(the schema describes each event)",
    "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    "headers": _READ_HEADERS,
}


# The request and response bodies, as types; the component schemas are msgspec's
# JSON Schema of them. Bounds come from the modules that enforce them.
Seq = Annotated[int, msgspec.Meta(ge=1)]
Cursor = Annotated[int, msgspec.Meta(ge=0)]
AnyJSON = Annotated[Any, msgspec.Meta(description=_ANY_JSON["description"])]


class Error(msgspec.Struct):
    error: str
    message: str


class Ok(msgspec.Struct):
    ok: Literal[True]


class Row(msgspec.Struct):
    seq: Seq
    body: AnyJSON


class Nudge(msgspec.Struct):
    seq: Cursor


class Gap(msgspec.Struct):
    oldest: Cursor


class Pushed(msgspec.Struct, omit_defaults=True):
    seq: Seq
    duplicate: bool = False


class BatchPushed(msgspec.Struct, omit_defaults=True):
    seqs: list[Seq]
    duplicates: list[bool] = []


class DeviceEntry(msgspec.Struct):
    device_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DEVICE_ID)]
    data: AnyJSON = None


class PairRequest(msgspec.Struct):
    payload: Annotated[
        str,
        msgspec.Meta(
            description=f"Opaque text, kept as sent: at most {PAIR_PAYLOAD_MAX} bytes as "
            f"UTF-8 (so at most {PAIR_PAYLOAD_MAX} characters; a rule on bytes the schema "
            "cannot state, over it is 400 payload_too_long), and not only "
            "white space (400 empty_payload)",
            min_length=1,
            max_length=PAIR_PAYLOAD_MAX,
            pattern=f"[^{_UNICODE_SPACE}]",
        ),
    ]
    ttl_secs: int | None = None


class PairCreated(msgspec.Struct):
    code: Annotated[str, msgspec.Meta(pattern=f"^[{PAIR_ALPHABET}]{{{PAIR_CODE_LEN}}}$")]
    expires_in: Annotated[int, msgspec.Meta(ge=PAIR_TTL_MIN, le=PAIR_TTL_MAX)]


class PairPayload(msgspec.Struct):
    payload: str


_SCHEMAS = msgspec.json.schema_components(
    [
        Error,
        Ok,
        Row,
        Nudge,
        Gap,
        Pushed,
        BatchPushed,
        DeviceEntry,
        PairRequest,
        PairCreated,
        PairPayload,
    ],
    ref_template="#/components/schemas/{name}",
)[1]


def _device_channel(name: str) -> dict[str, Any]:
    return {
        "parameters": [_WS],
        "get": {
            "summary": f"Read the devices' {name} entries (paged past HIVE_RELAY_MAX_PAGE_BYTES)",
            "operationId": f"get_{name}",
            "parameters": [_DEVICE_AFTER],
            "responses": {"200": _DEVICE_MAP, **_errors(400, 401, 403, 503)},
        },
        "post": {
            "summary": f"Replace one device's {name} entry",
            "operationId": f"post_{name}",
            "requestBody": _DEVICE_BODY,
            "responses": {"200": _OK, **_errors(400, 401, 403, 413, 429, 503)},
        },
    }


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/health": {
            "get": {
                "summary": "Health probe (never gated)",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": {
                        "description": "ok",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "503": {
                        "description": "store unavailable",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                        "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                    },
                },
            },
            "head": {
                "summary": "Health probe without a body",
                "operationId": "health_head",
                "security": [],
                "responses": {
                    "200": {"description": "ok"},
                    "503": {"description": "store unavailable"},
                },
            },
        },
        "/": {
            "get": {
                "summary": "Status page (HTML): version, uptime, counts, 15 minutes of charts",
                "operationId": "status_page",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/status/samples": {
            "get": {
                "summary": "The status page's charts as SSE: `event: buffer` (the last 15 "
                "minutes of relay-wide samples), then one `event: sample` per interval",
                "operationId": "status_samples",
                "security": [],
                "responses": {
                    "200": {
                        "description": "text/event-stream; each event's data is JSON: "
                        "buffer {interval, capacity, count, series, t, values}, "
                        "sample {count, t, values}",
                        "content": {"text/event-stream": {"schema": _SAMPLES_EVENT}},
                    },
                    **_errors(503),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (gated only when HIVE_RELAY_METRICS_TOKEN is set)",
                "operationId": "metrics",
                "security": [{}, {"bearer": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/v1/workspaces/{ws}/envelopes": {
            "parameters": [_WS],
            "post": {
                "summary": "Push one sealed envelope",
                "operationId": "push_envelope",
                "parameters": _IDEMPOTENCY,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ANY_JSON}},
                },
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Pushed"}),
                    **_errors(400, 401, 403, 413, 429, 503),
                },
            },
            "get": {
                "summary": "Read retained envelopes after a cursor (optionally long-polling)",
                "operationId": "read_envelopes",
                "parameters": [_AFTER, _LIMIT, _WAIT],
                "responses": {
                    "200": _json(
                        {"type": "array", "items": {"$ref": "#/components/schemas/Row"}},
                        "Rows, oldest first",
                        {
                            **_READ_HEADERS,
                            "X-Relay-More": {"$ref": "#/components/headers/X-Relay-More"},
                        },
                    ),
                    **_errors(400, 401, 403, 503),
                },
            },
        },
        "/v1/workspaces/{ws}/envelopes/batch": {
            "parameters": [_WS],
            "post": {
                "summary": f"Push 1–{MAX_BATCH} envelopes, all or nothing",
                "operationId": "push_batch",
                "parameters": [
                    {
                        "name": "Idempotency-Keys",
                        "in": "header",
                        "description": "Comma-separated dedup keys, exactly one entry per "
                        "element of the batch (a rule between header and body that the schema "
                        "cannot state; another count is 400 invalid_idempotency_key). Spaces and "
                        "tabs around an entry are ignored; each entry is then "
                        f"1–{MAX_KEY_LEN} of ! to ~ except the comma, or empty: that element is "
                        "deduplicated by the SHA-256 of its body.",
                        "schema": {
                            "type": "string",
                            "pattern": _KEYS_PATTERN,
                        },
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": MAX_BATCH,
                                "items": _ANY_JSON,
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/BatchPushed"}),
                    **_errors(400, 401, 403, 413, 429, 503),
                },
            },
        },
        "/v1/workspaces/{ws}/events": {
            "parameters": [_WS],
            "get": {
                "summary": "Live stream (SSE): seq nudges, or whole rows with bodies=1",
                "operationId": "events",
                "parameters": [
                    {
                        "name": "bodies",
                        "in": "query",
                        "description": "1 = stream whole rows with the seq as the SSE id",
                        "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                    },
                    _AFTER,
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Resume cursor (bodies=1): a seq below 2^64; wins over "
                        "after. Blank is the same as absent.",
                        "schema": {
                            "type": "string",
                            "pattern": f"^{_SPACE}(?:{uint_pattern(MAX_U64)})?{_SPACE}$",
                        },
                    },
                ],
                "responses": {"200": _SSE, **_errors(400, 401, 403, 503)},
            },
        },
        "/v1/workspaces/{ws}/ws": {
            "parameters": [_WS],
            "get": {
                "summary": "WebSocket: sub/pub/ack/env/gap/error JSON frames (upgrade required)",
                "operationId": "websocket",
                "responses": {
                    "101": {"description": "Switching Protocols"},
                    **_errors(400, 401, 403, 404, 503),
                },
            },
        },
        "/v1/workspaces/{ws}/keyring": {
            "parameters": [_WS],
            "get": {
                "summary": "Key-rotation blobs, oldest first; one page (the newest blobs) "
                "at most HIVE_RELAY_MAX_PAGE_BYTES",
                "operationId": "get_keyring",
                "parameters": [_KEYRING_BEFORE],
                "responses": {
                    "200": _json({"type": "array", "items": _ANY_JSON}, "OK", _PAGE_HEADERS),
                    **_errors(400, 401, 403, 503),
                },
            },
            "post": {
                "summary": "Append a sealed key-rotation blob",
                "operationId": "post_keyring",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ANY_JSON}},
                },
                "responses": {"200": _OK, **_errors(400, 401, 403, 413, 429, 503)},
            },
        },
        "/v1/workspaces/{ws}/presence": _device_channel("presence"),
        "/v1/workspaces/{ws}/candidates": _device_channel("candidates"),
        "/v1/pair": {
            "post": {
                "summary": "Create a pairing code (rate-limited per client)",
                "operationId": "pair_create",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/PairRequest"}}
                    },
                },
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/PairCreated"}),
                    **_errors(400, 401, 413, 429, 503),
                },
            }
        },
        "/v1/pair/{code}": {
            "parameters": [
                {
                    "name": "code",
                    "in": "path",
                    "required": True,
                    "description": "The code; separators and case are ignored",
                    "schema": {"type": "string"},
                }
            ],
            "get": {
                "summary": "Resolve a pairing code (rate-limited per client)",
                "operationId": "pair_resolve",
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/PairPayload"}),
                    **_errors(401, 404, 429, 503),
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hive-relay",
            "version": __version__,
            "description": "Content-blind relay for end-to-end-encrypted event envelopes "
            "(the /v1 workspace-sync contract plus extensions). Besides the answers listed "
            "per operation, any request may be answered 431 headers_too_large (request line "
            "and headers over HIVE_RELAY_HEADER_LIMIT), 400 bad_request (a request the HTTP "
            "parser cannot read; the connection then closes), 404 not_found or 405 "
            "method_not_allowed (with Allow) for a path or method the relay does not serve, "
            "and 500 internal_error, which is always a relay bug. Errors are JSON "
            '`{"error": "<code>", "message": "<sentence>"}`.',
        },
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A static allowlisted token or a signed hrt1 token",
                }
            },
            "headers": {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}},
                "X-Relay-Head": {
                    "description": "Highest seq of the workspace (0 if none)",
                    "schema": {"type": "string"},
                },
                "X-Relay-Oldest": {
                    "description": "Lowest retained seq (0 if none)",
                    "schema": {"type": "string"},
                },
                "X-Relay-Epoch": {
                    "description": "Names the store's history",
                    "schema": {"type": "string"},
                },
                "X-Relay-Gap": {
                    "description": "true when the cursor is below dropped history",
                    "schema": {"type": "string", "enum": ["true"]},
                },
                "X-Relay-More": {
                    "description": "true when rows (or side-channel entries) past this page remain",
                    "schema": {"type": "string", "enum": ["true"]},
                },
                "X-Relay-Next": {
                    "description": "Side-channel reads: the query string of the next page "
                    "(before=N on a keyring, after=<device_id> percent-encoded on presence "
                    "and candidates); sent with X-Relay-More",
                    "schema": {"type": "string", "pattern": "^(?:before=[0-9]+|after=.+)$"},
                },
            },
            "schemas": _SCHEMAS,
        },
    }
