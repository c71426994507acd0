"""Fuzz the whole API from its own /openapi.json with schemathesis, every check on.

Every operation the document describes is called with schema-valid and
schema-violating data (schemathesis's examples, coverage and fuzzing phases), and
every answer must pass every built-in check: no server error, a status, content
type, headers and body the document describes, invalid data rejected, valid data
accepted, the Allow header of a 405 right, and so on. The checks keep
schemathesis's default expectations (what `schemathesis run --checks all`
applies) but for the refusal of invalid data: 413 counts (a body over the
relay's size limit), 5xx does not. Two rules
JSON Schema cannot state (one Idempotency-Keys entry per batch element; a
pairing payload's limit in UTF-8 bytes) are obeyed by the schema-valid cases
and described in the document's prose.

Two relays are fuzzed in-process (the ASGI app, no sockets):

* an open relay with the rate limits off, so generated data reaches every handler;
* a relay behind a token allowlist, called with the token (and probed without it).

The number of generated examples per operation is bounded for CI
(`HIVE_RELAY_FUZZ_EXAMPLES`, default 25); `make fuzz` runs many more.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the dev extra is not installed")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.generation.meta import TestPhase  # noqa: E402
from starlette.types import Message, Receive, Scope, Send  # noqa: E402

from relay.api.live import KEEPALIVE  # noqa: E402
from relay.app import create_app  # noqa: E402
from relay.settings import Settings  # noqa: E402

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("HIVE_RELAY_FUZZ_EXAMPLES", "25"))
TOKEN = "fuzz-token-7d1c"
# A safety net only: every answer, live streams included, ends well before it.
CALL_TIMEOUT = 30.0

load_all_checks()
# Every built-in check, not only the ones enabled by default (all are functions).
ALL_CHECKS = list(CHECKS.get_all())
assert len(ALL_CHECKS) >= 14 and not any(isinstance(c, type) for c in ALL_CHECKS)

# What counts as refusing invalid data: schemathesis's defaults, plus 413 for a
# request body over HIVE_RELAY_MAX_BODY_BYTES (a 1001-element batch of big
# elements is refused for its size before it is parsed), and without 5xx, which
# is never a refusal here. No field of a body is refused with 413: a pairing
# payload over its limit is 400 payload_too_long.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}}
)


class FreshRelay:
    """The relay app, built anew at each lifespan start-up, with live streams that
    end once the relay falls idle.

    schemathesis ends the app's lifespan after each test and starts it again for
    the next; a relay's lifespan runs once per process (its shutdown closes the
    hub for good), so each test gets a fresh relay, as a restarted process would.

    An SSE answer never ends by itself. The first `: keep-alive` comment means the
    relay has sent everything it had (it is sent only after `keepalive_secs` of
    silence in the live phase), so the stream is ended there, as a client that
    hangs up would end it: the transport gets a complete answer to validate, and
    the relay sees the disconnect. No result depends on how long anything takes.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.app = create_app(self.settings)
            await self.app(scope, receive, send)
            return
        streaming = False
        ended = anyio.Event()

        async def hang_up_when_idle(message: Message) -> None:
            nonlocal streaming
            if ended.is_set():
                return
            if message["type"] == "http.response.start":
                streaming = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in message.get("headers", ())
                )
            elif streaming and message.get("body") == KEEPALIVE:
                ended.set()
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def receive_or_hang_up() -> Message:
            if ended.is_set():
                return {"type": "http.disconnect"}
            return await receive()

        await self.app(scope, receive_or_hang_up, hang_up_when_idle)


OPEN = FreshRelay(
    Settings(
        push_rate=0,
        pair_resolve_rate=0,
        pair_create_rate=0,
        keepalive_secs=0.05,
        max_body_bytes=64 * 1024,
    )
)
GATED = FreshRelay(Settings(access_tokens=TOKEN, max_body_bytes=64 * 1024, keepalive_secs=0.05))

open_schema = schemathesis.openapi.from_asgi("/openapi.json", OPEN, config=CONFIG)
gated_schema = schemathesis.openapi.from_asgi("/openapi.json", GATED, config=CONFIG)


def _bounded_long_poll(case: Any) -> None:
    """A schema-valid `wait` holds the request up to 60 s when no row is past the
    cursor. The boundary cases (schemathesis's coverage phase) hold one second;
    random ones do not hold, so the run stays short. (`wait` outside 0–60 is still
    sent as generated, and must be refused at once.)"""
    if case.operation.path != "/v1/workspaces/{ws}/envelopes" or not case.query:
        return
    wait = case.query.get("wait")
    if isinstance(wait, bool) or not isinstance(wait, int | str):
        return
    if str(wait).isdigit() and 1 < int(wait) <= 60:
        coverage = case.meta is not None and case.meta.phase.name == TestPhase.COVERAGE
        case.query["wait"] = type(wait)(1 if coverage else 0)


def _consistent_batch_keys(case: Any) -> None:
    """`Idempotency-Keys` must hold one entry per element of the batch: a rule
    between a header and the body that OpenAPI cannot state. Schema-valid cases
    get a header that obeys it; schema-violating ones are sent as generated."""
    if case.operation.path != "/v1/workspaces/{ws}/envelopes/batch":
        return
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        return
    headers = case.headers or {}
    value = headers.get("Idempotency-Keys")
    if value is None or not isinstance(case.body, list):
        return
    parts = str(value).split(",")
    want = len(case.body)
    parts = (parts + [""] * want)[:want]
    headers["Idempotency-Keys"] = ",".join(parts)


def _pair_payload_in_bytes(case: Any) -> None:
    """A pairing payload is at most 8192 bytes in UTF-8: a rule on bytes that JSON
    Schema (which counts characters) cannot state; the document says it in prose.
    Schema-valid cases get a payload cut to fit; schema-violating ones are sent as
    generated."""
    if case.operation.path != "/v1/pair" or case.operation.method.lower() != "post":
        return
    if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
        return
    payload = case.body.get("payload") if isinstance(case.body, dict) else None
    if not isinstance(payload, str) or len(payload.encode("utf-8", "surrogatepass")) <= 8192:
        return
    while len(payload.encode("utf-8", "surrogatepass")) > 8192:
        payload = payload[: len(payload) // 2]
    case.body["payload"] = payload if payload.strip() else "x" + payload[1:]


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
# The gated relay runs the same handlers; its run is about the token, so it is shorter.
FUZZ_GATED = settings(FUZZ, max_examples=max(5, EXAMPLES // 3))


@open_schema.parametrize()
@FUZZ
def test_open_relay_conforms_to_its_document(case: Any) -> None:
    _bounded_long_poll(case)
    _consistent_batch_keys(case)
    _pair_payload_in_bytes(case)
    case.call_and_validate(checks=ALL_CHECKS, timeout=CALL_TIMEOUT)


@gated_schema.parametrize()
@FUZZ_GATED
def test_gated_relay_conforms_to_its_document(case: Any) -> None:
    _bounded_long_poll(case)
    _consistent_batch_keys(case)
    _pair_payload_in_bytes(case)
    case.call_and_validate(
        checks=ALL_CHECKS, timeout=CALL_TIMEOUT, headers={"Authorization": f"Bearer {TOKEN}"}
    )


def _patterns(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        return found + [p for v in node.values() for p in _patterns(v)]
    if isinstance(node, list):
        return [p for v in node for p in _patterns(v)]
    return []


def test_every_pattern_of_the_document_is_usable() -> None:
    """A pattern a validator cannot compile is dropped (schemathesis then warns and
    generates any string): the rule it states would go unchecked. Rust's regex
    engine (jsonschema-rs, which schemathesis validates with) bounds a compiled
    pattern's size, so a nested bounded repetition can be refused where Python's
    `re` takes it."""
    import re

    import jsonschema_rs

    from relay.openapi import openapi_document

    patterns = _patterns(openapi_document())
    assert len(patterns) >= 4
    for pattern in patterns:
        re.compile(pattern)
        jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
