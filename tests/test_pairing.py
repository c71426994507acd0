"""Pairing codes on a real relay with its default limits: what a create may hold,
and how much of the relay one client's creates may take.

The relay process trusts the test process as a proxy, so each test speaks for
clients of its own with X-Forwarded-For; everything else is a default setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from tests.rawhttp import assert_clean_4xx
from tests.relayproc import RelayProcess
from tests.support import as_client

# Real relay processes: seconds per test (make test-fast leaves them out).
pytestmark = pytest.mark.slow

WAIT = 20.0
BURST = 10  # HIVE_RELAY_PAIR_CREATE_RATE's burst
PAYLOAD_MAX = 8192  # UTF-8 bytes


@pytest.fixture(scope="module")
def relay() -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_TRUSTED_PROXIES": "127.0.0.1"}) as proc:
        yield proc
    assert "Traceback" not in proc.logs()


def pairings(relay: RelayProcess) -> float:
    text = httpx.get(relay.url + "/metrics", timeout=WAIT).text
    m = re.search(r"^hive_relay_pairings (\S+)$", text, re.M)
    assert m, text[:500]
    return float(m.group(1))


def create(c: httpx.Client, client: str, payload: str) -> httpx.Response:
    body = msgspec.json.encode({"payload": payload})
    return c.post("/v1/pair", content=body, headers=as_client(client))


def test_pair_creates_are_rate_limited_per_client(relay: RelayProcess) -> None:
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        made = [create(c, "10.2.0.1", f"invite {i}") for i in range(BURST)]
        assert [r.status_code for r in made] == [200] * BURST, [r.text for r in made]
        held = pairings(relay)
        refused = [create(c, "10.2.0.1", "one more") for _ in range(5)]
        # Refused before the body is read: a malformed create costs no more.
        refused.append(c.post("/v1/pair", content=b'{"payload":', headers=as_client("10.2.0.1")))
        for r in refused:
            assert_clean_4xx(r, 429)
            assert r.json()["error"] == "pair_create_rate_limited"
            assert int(r.headers["retry-after"]) >= 1
        assert pairings(relay) == held
        # Another client is not held back by the first one's flood.
        other = create(c, "10.2.0.2", "mine")
        assert other.status_code == 200, other.text
        code = other.json()["code"]
        assert c.get(f"/v1/pair/{code}", headers=as_client("10.2.0.3")).json() == {
            "payload": "mine"
        }


PAYLOADS_OVER_THE_LIMIT = {
    "ascii": "x" * (PAYLOAD_MAX + 1),
    "two-byte": "é" * (PAYLOAD_MAX // 2 + 1),
    "four-byte": "😀" * (PAYLOAD_MAX // 4 + 1),
    "mixed": "x" * (PAYLOAD_MAX - 1) + "é",
}


@pytest.mark.parametrize("payload", PAYLOADS_OVER_THE_LIMIT.values(), ids=PAYLOADS_OVER_THE_LIMIT)
def test_pair_payload_limit_counts_utf8_bytes(relay: RelayProcess, payload: str) -> None:
    client = f"10.3.{len(payload) % 250}.{len(payload.encode()) % 250}"
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        held = pairings(relay)
        r = create(c, client, payload)
        assert_clean_4xx(r, 400)
        assert r.json()["error"] == "payload_too_long"
        assert pairings(relay) == held


@pytest.mark.parametrize("payload", ["x" * PAYLOAD_MAX, "é" * (PAYLOAD_MAX // 2), "😀" * 2048])
def test_pair_payload_of_exactly_the_limit_round_trips(relay: RelayProcess, payload: str) -> None:
    client = f"10.4.0.{len(payload) % 250}"
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        r = create(c, client, payload)
        assert r.status_code == 200, r.text
        found = c.get(f"/v1/pair/{r.json()['code']}", headers=as_client(client))
        assert found.json() == {"payload": payload}


WHITESPACE_ONLY = [" ", "\t\n\r ", "\u00a0", "\u3000\u2028", " " * (PAYLOAD_MAX - 1)]


@pytest.mark.parametrize("payload", WHITESPACE_ONLY)
def test_pair_payload_of_only_white_space_is_400(relay: RelayProcess, payload: str) -> None:
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        held = pairings(relay)
        r = create(c, "10.5.0.1", payload)
        assert_clean_4xx(r, 400)
        assert r.json()["error"] == "empty_payload"
        assert pairings(relay) == held
        # Something besides white space is a payload (kept as sent).
        r = create(c, "10.5.0.2", payload + ".")
        assert r.status_code == 200, r.text
        found = c.get(f"/v1/pair/{r.json()['code']}", headers=as_client("10.5.0.2"))
        assert found.json() == {"payload": payload + "."}


def test_pair_body_is_bounded_below_the_envelope_limit(relay: RelayProcess) -> None:
    """A create body is read up to 64 KiB (the largest payload with every character
    escaped fits), not up to HIVE_RELAY_MAX_BODY_BYTES (4 MiB)."""
    padded = b'{"payload":"p"' + b" " * (64 * 1024) + b"}"
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        held = pairings(relay)
        r = c.post("/v1/pair", content=padded, headers=as_client("10.6.0.1"))
        assert_clean_4xx(r, 413)
        assert r.json()["error"] == "payload_too_large"
        assert pairings(relay) == held
        escaped = b'{"payload":"' + b"\\u0041" * PAYLOAD_MAX + b'"}'
        r = c.post("/v1/pair", content=escaped, headers=as_client("10.6.0.2"))
        assert r.status_code == 200, r.text


def test_pair_ttl_as_a_whole_float_is_taken_and_a_fraction_is_400(relay: RelayProcess) -> None:
    """JSON has one number type: `30.0` is the integer the API document allows (the
    fuzz test found it answered 400); `30.5` seconds is refused and creates nothing."""
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        r = c.post(
            "/v1/pair", content=b'{"payload":"p","ttl_secs":90.0}', headers=as_client("10.7.0.1")
        )
        assert r.status_code == 200, r.text
        assert r.json()["expires_in"] == 90
        held = pairings(relay)
        r = c.post(
            "/v1/pair", content=b'{"payload":"p","ttl_secs":90.5}', headers=as_client("10.7.0.2")
        )
        assert_clean_4xx(r, 400)
        assert r.json()["error"] == "invalid_body"
        assert "whole number" in r.json()["message"]
        assert pairings(relay) == held
