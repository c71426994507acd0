"""Security properties: secrets stay out of logs and metrics, tokens are compared as
digests, every answer carries the security headers, CORS is off unless an origin
list turns it on, and a failure inside the relay never shows a client its internals.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from starlette.testclient import TestClient

from relay.access import AllowlistPolicy, SignedTokenPolicy, issue_token
from relay.app import create_app
from relay.settings import Settings
from relay.store.memory import MemoryStore
from tests.rawhttp import exchange, request, upgrade
from tests.relayproc import RelayProcess

TOKEN = "sec-token-5d2e8a1f"
NEAR_MISS = TOKEN[:-1] + "0"
METRICS_TOKEN = "metrics-token-c41b77"
WAIT = 20.0


# ------------------------------------------------- tokens never in logs or metrics
def _use_every_way(relay: RelayProcess, tokens: list[str]) -> None:
    """Put each token in front of the relay in every place a client might put one,
    including the wrong places and requests the relay refuses."""
    with httpx.Client(base_url=relay.url, timeout=WAIT) as c:
        for token in tokens:
            auth = {"Authorization": f"Bearer {token}"}
            c.post("/v1/workspaces/w/envelopes", json={"x": 1}, headers=auth)
            c.get("/v1/workspaces/w/envelopes?after=0", headers=auth)
            c.get("/v1/workspaces/w/envelopes?after=bad", headers=auth)  # 400
            c.post("/v1/workspaces/w/envelopes", content=b"{", headers=auth)  # 400
            c.get(f"/v1/workspaces/w/envelopes?token={token}", headers=auth)  # in a query
            c.get(f"/v1/{token}/nowhere", headers=auth)  # 404 with the token in the path
            c.get("/v1/pair/ABC123", headers=auth)
            c.get("/metrics", headers=auth)
            c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
            c.get("/v1/health", headers={"Authorization": f"Basic {token}"})
            c.get("/v1/health", headers={"X-Big": "a" * 40_000, **auth})  # 431
            c.request("DELETE", "/v1/workspaces/w/envelopes", headers=auth)  # 405
            # Raw: uvicorn's parser refuses these before the app sees them.
            exchange(relay, request("GET", f"/v1/{token}\x01", {"Authorization": token}))
            exchange(relay, b"BOGUS " + token.encode() + b" HTTP/1.1\r\n\r\n")

        async def sockets() -> None:
            url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/w/ws"
            for token in tokens:
                for kwargs in (
                    {"subprotocols": [f"bearer.{token}"]},
                    {"additional_headers": {"Authorization": f"Bearer {token}"}},
                ):
                    try:
                        async with websockets.connect(url, **kwargs) as sock:  # type: ignore[arg-type]
                            await sock.send(json.dumps({"op": "pub", "body": {"t": 1}}))
                            await asyncio.wait_for(sock.recv(), WAIT)
                    except websockets.InvalidStatus:
                        pass

        asyncio.run(sockets())


def _assert_secret_free(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} appears in {where}"
        # Nor a recognisable piece of it (a token cut by a log formatter).
        assert secret[: len(secret) * 2 // 3] not in text, f"part of {secret!r} in {where}"


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_tokens_never_appear_in_logs_or_metrics(log_format: str) -> None:
    env = {
        "HIVE_RELAY_ACCESS_TOKENS": TOKEN,
        "HIVE_RELAY_METRICS_TOKEN": METRICS_TOKEN,
        "HIVE_RELAY_LOG_LEVEL": "debug",  # the most the relay ever says
        "HIVE_RELAY_LOG_FORMAT": log_format,
        "HIVE_RELAY_HEADER_LIMIT": "16384",
    }
    with RelayProcess(env=env) as relay:
        _use_every_way(relay, [TOKEN, NEAR_MISS])
        metrics = httpx.get(
            relay.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        ).text
        status_page = httpx.get(relay.url + "/").text
        assert relay.stop() == 0
    log = relay.logs()
    assert "relay.access" in log  # the gated run did log its requests
    secrets = [TOKEN, NEAR_MISS, METRICS_TOKEN]
    _assert_secret_free(log, secrets, "the relay's log")
    _assert_secret_free(metrics, secrets, "/metrics")
    _assert_secret_free(status_page, secrets, "the status page")


@pytest.mark.slow
def test_signed_tokens_never_appear_in_logs() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    good = issue_token(raw, "alice", 0, ["w"], None)
    forged = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    other_ws = issue_token(raw, "bob", 0, ["elsewhere"], None)
    env = {"HIVE_RELAY_TOKEN_PUBKEY": public, "HIVE_RELAY_LOG_LEVEL": "debug"}
    with RelayProcess(env=env) as relay:
        _use_every_way(relay, [good, forged, other_ws])
        metrics = httpx.get(relay.url + "/metrics").text
        assert relay.stop() == 0
    log = relay.logs()
    for token in (good, forged, other_ws):
        signature = token.rsplit(".", 1)[1]
        _assert_secret_free(log, [token, signature], "the relay's log")
        _assert_secret_free(metrics, [token, signature], "/metrics")


# ------------------------------------------------------ tokens compared as digests
class Watched(str):
    """A token that records every comparison or hash made of it as a string."""

    uses: list[str]

    def __new__(cls, value: str) -> Watched:
        obj = super().__new__(cls, value)
        obj.uses = []
        return obj

    def _use(self, name: str) -> None:
        self.uses.append(name)

    def __eq__(self, other: object) -> bool:
        self._use("==")
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._use("!=")
        return str.__ne__(self, other)

    def __hash__(self) -> int:
        self._use("hash")
        return str.__hash__(self)

    def __lt__(self, other: str) -> bool:
        self._use("<")
        return str.__lt__(self, other)

    def startswith(self, *args: Any) -> bool:  # type: ignore[override]
        self._use("startswith")
        return str.startswith(self, *args)

    def __contains__(self, item: object) -> bool:
        self._use("in")
        return str.__contains__(self, item)  # type: ignore[operator]


@pytest.mark.parametrize("given", [TOKEN, NEAR_MISS, "x", TOKEN + TOKEN])
def test_allowlist_compares_digests_never_the_token(given: str) -> None:
    """A comparison of raw strings ends at the first differing character, so its
    time tells an attacker how much of a guess is right; a digest lookup does not."""
    policy = AllowlistPolicy([TOKEN, "another-token"])
    token = Watched(given)
    try:
        policy.authenticate(token)
    except Exception as exc:  # Denied
        assert getattr(exc, "status", None) == 401
    assert token.uses == [], f"the token was used as a string: {token.uses}"


def test_signed_token_cache_is_keyed_by_digest() -> None:
    key = Ed25519PrivateKey.generate()
    policy = SignedTokenPolicy([key.public_key()])
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    good = issue_token(raw, "alice", 0, None, None)
    for given in (good, good[:-2] + "xx", "hrt1.e30.e30"):
        token = Watched(given)
        for _ in range(2):  # the second time answers from the cache
            try:
                policy.authenticate(token)
            except Exception as exc:  # Denied
                assert getattr(exc, "status", None) == 401
        assert "hash" not in token.uses and "==" not in token.uses, token.uses


def test_metrics_token_is_compared_as_a_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.api.public as public

    seen: list[Watched] = []

    def watched_bearer(header: str | None) -> str | None:
        value = header.partition(" ")[2] if header else None
        if value is None:
            return None
        seen.append(Watched(value))
        return seen[-1]

    monkeypatch.setattr(public, "bearer_token", watched_bearer)
    with TestClient(create_app(Settings(metrics_token=METRICS_TOKEN))) as c:
        for given in (METRICS_TOKEN, NEAR_MISS, "m"):
            c.get("/metrics", headers={"Authorization": f"Bearer {given}"})
    assert len(seen) == 3
    for token in seen:
        assert token.uses == [], token.uses


# ------------------------------------------------------------- security headers
SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def assert_security_headers(headers: Any, what: str) -> None:
    for name, value in SECURITY.items():
        assert headers.get(name) == value, f"{what}: {name} is {headers.get(name)!r}"


@pytest.fixture(scope="module")
def proc() -> Iterator[RelayProcess]:
    env = {
        "HIVE_RELAY_ACCESS_TOKENS": TOKEN,
        "HIVE_RELAY_MAX_BODY_BYTES": "1024",
        "HIVE_RELAY_HEADER_LIMIT": "4096",
        "HIVE_RELAY_PUSH_RATE": "0.001",
        "HIVE_RELAY_PUSH_BURST": "1",
        "HIVE_RELAY_MAX_SSE_PER_CLIENT": "1",
    }
    with RelayProcess(env=env) as relay:
        yield relay


@pytest.mark.slow
def test_security_headers_on_every_answer(proc: RelayProcess) -> None:
    """Every status the relay itself answers, every route, streams included."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ws = "/v1/workspaces/w"
    with httpx.Client(base_url=proc.url, timeout=WAIT) as c:
        answers = {
            "status page": c.get("/"),
            "health": c.get("/v1/health"),
            "health HEAD": c.head("/v1/health"),
            "metrics": c.get("/metrics"),
            "openapi": c.get("/openapi.json"),
            "push 200": c.post(f"{ws}/envelopes", json=1, headers=auth),
            "push 429": c.post(f"{ws}/envelopes", json=2, headers=auth),
            "read 200": c.get(f"{ws}/envelopes", headers=auth),
            "read 400": c.get(f"{ws}/envelopes?after=x", headers=auth),
            "read 401": c.get(f"{ws}/envelopes"),
            "batch 413": c.post(f"{ws}/envelopes/batch", content=b"[" + b"1," * 800 + b"1]"),
            "keyring 200": c.get(f"{ws}/keyring", headers=auth),
            "presence 400": c.post(f"{ws}/presence", json={}, headers=auth),
            "pair 404": c.get("/v1/pair/ZZZZZZ", headers=auth),
            "404": c.get("/nowhere"),
            "405": c.delete(f"{ws}/envelopes", headers=auth),
            "431": c.get("/v1/health", headers={"X-Big": "a" * 8000}),
            "bad workspace": c.get("/v1/workspaces/%2e%2e/envelopes", headers=auth),
        }
        with c.stream("GET", f"{ws}/events", headers=auth) as sse:
            answers["SSE"] = sse  # type: ignore[assignment]
            answers["SSE 503"] = c.get(f"{ws}/events", headers=auth)
        for what, r in answers.items():
            assert_security_headers(r.headers, what)
        # The one stream slot this client has comes back once the relay has seen the
        # SSE client go; the WebSocket below needs it.
        deadline = time.monotonic() + WAIT
        while "hive_relay_live_streams 0.0" not in c.get("/metrics").text:
            assert time.monotonic() < deadline, "the SSE stream's slot was not released"
            time.sleep(0.05)

    async def socket_answers() -> None:
        url = f"ws://127.0.0.1:{proc.port}/v1/workspaces/w/ws"
        async with websockets.connect(url, additional_headers=auth) as ws:
            # A 101 has no body to sniff or to refer from: its headers are not checked.
            assert ws.response is not None and ws.response.status_code == 101
        for what, headers in (
            ("WebSocket 401 (no token)", {}),
            ("WebSocket 401 (wrong token)", {"Authorization": f"Bearer {NEAR_MISS}"}),
        ):
            assert_security_headers(await refused_upgrade(url, headers, 401), what)

    asyncio.run(socket_answers())
    (denied,) = exchange(proc, upgrade("/v1/workspaces/%2e%2e/ws"))
    assert denied.status == 400
    assert_security_headers(denied.headers, "WebSocket 400")


async def refused_upgrade(url: str, headers: dict[str, str], status: int) -> Any:
    """The answer to a WebSocket hand-shake that must be refused with `status`."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, additional_headers=headers):
            pass
    response = refused.value.response
    assert response.status_code == status, (response.status_code, response.body)
    assert json.loads(response.body)["error"] in ("unauthorized", "forbidden"), response.body
    return response.headers


@pytest.mark.slow
def test_security_headers_on_a_websocket_403() -> None:
    """A valid signed token for another workspace: the hand-shake is 403, with the headers."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    elsewhere = issue_token(raw, "bob", 0, ["elsewhere"], None)
    with RelayProcess(env={"HIVE_RELAY_TOKEN_PUBKEY": public}) as relay:
        url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/w/ws"
        auth = {"Authorization": f"Bearer {elsewhere}"}
        headers = asyncio.run(refused_upgrade(url, auth, 403))
        assert_security_headers(headers, "WebSocket 403")
        # The same token is good where it is scoped: the 403 is about the workspace.
        other = url.replace("/w/ws", "/elsewhere/ws")

        async def accepted() -> int:
            async with websockets.connect(other, additional_headers=auth) as ws:
                assert ws.response is not None
                return ws.response.status_code

        assert asyncio.run(accepted()) == 101


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_status_page_has_a_strict_content_security_policy() -> None:
    with TestClient(create_app(Settings())) as c:
        r = c.get("/")
    assert r.headers["content-type"].startswith("text/html")
    csp = {
        d.split()[0]: d.split()[1:]
        for d in (p.strip() for p in r.headers["content-security-policy"].split(";"))
        if d
    }
    assert csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'self'"]  # the samples stream, nothing else
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert csp["form-action"] == ["'none'"]
    for sources in csp.values():
        assert "*" not in sources and "'unsafe-eval'" not in sources, csp
        assert "'unsafe-inline'" not in sources and "'unsafe-hashes'" not in sources, csp
        assert not any(s.startswith(("http:", "https:", "data:")) for s in sources), csp
    # The one inline script and the one style block are allowed by their hashes alone,
    # so the hash in the header is the hash of exactly what the page carries.
    page = r.text
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert page.lower().count("<script") == 1 and page.lower().count("<style") == 1
    assert csp["script-src"] == [_sha256_source(scripts[0])]
    assert csp["style-src"] == [_sha256_source(styles[0])]
    # Nothing a hash cannot cover: no style attributes, no inline event handlers.
    assert not re.search(r"\sstyle=", page)
    assert not re.search(r"\son[a-z]+=", page)


# ---------------------------------------------------------------------- CORS
def test_cors_is_off_by_default() -> None:
    with TestClient(create_app(Settings())) as c:
        origin = {"Origin": "https://app.example"}
        r = c.get("/v1/workspaces/w/envelopes", headers=origin)
        assert r.status_code == 200
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        pre = c.options(
            "/v1/workspaces/w/envelopes",
            headers={**origin, "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 405
        assert "access-control-allow-origin" not in pre.headers


def test_cors_allows_only_the_listed_origins() -> None:
    settings = Settings(cors_origins="https://app.example, https://other.example:8443")
    with TestClient(create_app(settings)) as c:
        for origin in ("https://app.example", "https://other.example:8443"):
            r = c.get("/v1/workspaces/w/envelopes", headers={"Origin": origin})
            assert r.headers["access-control-allow-origin"] == origin
            assert "origin" in r.headers.get("vary", "").lower()
            exposed = r.headers["access-control-expose-headers"].lower()
            for name in ("x-relay-head", "x-relay-epoch", "x-relay-gap", "retry-after"):
                assert name in exposed
            # Bearer tokens, not cookies: credentials are never allowed.
            assert "access-control-allow-credentials" not in r.headers
            assert r.headers["x-content-type-options"] == "nosniff"  # CORS wraps the hot lane
            pre = c.options(
                "/v1/workspaces/w/envelopes",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, idempotency-key",
                },
            )
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == origin
            allowed = pre.headers["access-control-allow-headers"].lower()
            assert "authorization" in allowed and "idempotency-key" in allowed
        for stranger in ("https://evil.example", "https://app.example.evil", "null"):
            r = c.get("/v1/workspaces/w/envelopes", headers={"Origin": stranger})
            assert "access-control-allow-origin" not in r.headers, stranger
            pre = c.options(
                "/v1/workspaces/w/envelopes",
                headers={"Origin": stranger, "Access-Control-Request-Method": "POST"},
            )
            assert pre.status_code == 400
            assert "access-control-allow-origin" not in pre.headers
        # Errors a browser client must read carry CORS headers too.
        r = c.get("/v1/workspaces/w/envelopes?after=x", headers={"Origin": "https://app.example"})
        assert r.status_code == 400
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_wildcard() -> None:
    with TestClient(create_app(Settings(cors_origins="*"))) as c:
        r = c.get("/v1/health", headers={"Origin": "https://anywhere.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


# -------------------------------------------------------- no stack traces to clients
class BrokenStore(MemoryStore):
    """A store with bugs: reads of workspace `broken`, every append and every keyring
    read raise unexpected errors."""

    async def read(self, ws: str, after: int, limit: int, max_bytes: int) -> Any:
        if ws == "broken":
            raise RuntimeError("secret internal detail /srv/relay/store.py line 42")
        return await super().read(ws, after, limit, max_bytes)

    async def append(self, ws: str, body: bytes, key: bytes) -> tuple[int, bool]:
        raise KeyError("another secret internal detail")

    async def append_batch(self, ws: str, bodies: list[bytes], keys: list[bytes]) -> Any:
        raise KeyError("yet another secret internal detail")

    async def keyring_list(self, ws: str) -> list[bytes]:
        raise ZeroDivisionError("division by zero in the keyring")


def assert_opaque_500(r: httpx.Response) -> None:
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "the relay hit an unexpected error"}
    for leak in ("Traceback", "secret", "RuntimeError", "KeyError", ".py", "line "):
        assert leak not in r.text
    assert_security_headers(r.headers, "500")


@pytest.mark.parametrize("cors", ["", "https://app.example"])
def test_no_stack_traces_to_clients(caplog: pytest.LogCaptureFixture, cors: str) -> None:
    """The hot routes are served by relay/app.py's hot lane, the rest by Starlette's
    router, with CORS off or on: a bug must end the same way in every case."""
    app = create_app(Settings(cors_origins=cors), store=BrokenStore())
    with TestClient(app, raise_server_exceptions=False) as c:
        assert_opaque_500(c.get("/v1/workspaces/broken/envelopes"))  # the hot path
        assert_opaque_500(c.post("/v1/workspaces/w/envelopes", json=1))
        assert_opaque_500(c.post("/v1/workspaces/w/envelopes/batch", json=[1]))
        assert_opaque_500(c.get("/v1/workspaces/w/keyring"))  # the router
        assert_opaque_500(c.get("/v1/workspaces/broken/events?bodies=1&after=0"))
        status = c.get("/")  # the status page reads stats, which still work
        assert status.status_code == 200
        with c.websocket_connect("/v1/workspaces/w/ws") as sock:
            sock.send_text(json.dumps({"op": "pub", "body": 1, "ref": 7}))
            frame = json.loads(sock.receive_text())
            assert frame["op"] == "error" and frame["ref"] == 7
            assert "secret" not in json.dumps(frame) and "Traceback" not in json.dumps(frame)


def test_debug_mode_is_off() -> None:
    app = create_app(Settings())
    assert app.debug is False


def test_error_bodies_are_never_html() -> None:
    """A browser told nosniff gets JSON errors only, never markup that could render."""
    with TestClient(create_app(Settings(access_tokens=TOKEN))) as c:
        for r in (
            c.get("/nowhere/<script>alert(1)</script>"),
            c.get("/v1/workspaces/<b>x</b>/envelopes"),
            c.get("/v1/workspaces/w/envelopes", headers={"Authorization": "Bearer <img>"}),
        ):
            assert r.headers["content-type"] == "application/json"
            assert "<" not in r.text


def test_status_page_and_metrics_reveal_no_workspace_ids() -> None:
    with TestClient(create_app(Settings())) as c:
        c.post("/v1/workspaces/ws-secret-7f/envelopes", json={"sealed": "x"})
        for text in (c.get("/").text, c.get("/metrics").text):
            assert "ws-secret-7f" not in text
            assert not re.search(r"sealed", text)
