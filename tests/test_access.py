"""Access policies: open, static allowlist (env and file), signed hrt1 tokens.

Through the ASGI app, plus the operator's `python -m relay token …` tools end
to end against a real relay process.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.testclient import TestClient, WebSocketDenialResponse

import relay.access
from relay.app import create_app
from relay.settings import Settings, SettingsError
from tests.relayproc import REPO, RelayProcess, relay_env
from tests.support import make_unlimited_client as make_client

# (method, path, body) of every gated route. Events is checked for refusals only:
# a granted SSE request would stream forever.
GATED = [
    ("POST", "/v1/workspaces/{ws}/envelopes", b'{"n":1}'),
    ("GET", "/v1/workspaces/{ws}/envelopes", None),
    ("POST", "/v1/workspaces/{ws}/envelopes/batch", b"[1]"),
    ("POST", "/v1/workspaces/{ws}/keyring", b'"blob"'),
    ("GET", "/v1/workspaces/{ws}/keyring", None),
    ("POST", "/v1/workspaces/{ws}/presence", b'{"device_id":"d","data":1}'),
    ("GET", "/v1/workspaces/{ws}/presence", None),
    ("POST", "/v1/workspaces/{ws}/candidates", b'{"device_id":"d","data":1}'),
    ("GET", "/v1/workspaces/{ws}/candidates", None),
    ("GET", "/v1/workspaces/{ws}/events", None),
]
WS_GATED = [g for g in GATED if "{ws}" in g[1]]
PAIR_ROUTES = [("POST", "/v1/pair", b'{"payload":"p"}'), ("GET", "/v1/pair/ZZZZZZ", None)]
ALL_GATED = GATED + PAIR_ROUTES
IDS = [f"{m} {p}" for m, p, _ in ALL_GATED]


def call(
    c: TestClient, method: str, path: str, body: bytes | None, token: str | None, ws: str = "alpha"
) -> Any:
    # Bytes, so a test can send a header that is not ASCII.
    headers = {"Authorization": f"Bearer {token}".encode()} if token is not None else {}
    return c.request(method, path.replace("{ws}", ws), content=body, headers=headers)


def assert_unauthorized(r: Any) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["www-authenticate"].split()[0] == "Bearer"
    assert r.json()["error"] == "unauthorized"
    assert r.json()["message"]


def assert_forbidden(r: Any) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.json()["error"] == "forbidden"
    assert r.json()["message"]


def assert_granted(r: Any, path: str) -> None:
    # An unknown pairing code is a 404 from behind the gate.
    expected = 404 if path.startswith("/v1/pair/") else 200
    assert r.status_code == expected, (r.status_code, r.text)


def contents(c: TestClient, ws: str, token: str | None) -> tuple[bytes, ...]:
    """Everything stored under a workspace, read with a token that may read it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return tuple(
        c.get(f"/v1/workspaces/{ws}/{what}", headers=headers).content
        for what in ("envelopes", "keyring", "presence", "candidates")
    )


EMPTY = (b"[]", b"[]", b"{}", b"{}")


# ----------------------------------------------------------------------- open
def test_open_relay_needs_no_token() -> None:
    with make_client() as c:
        for method, path, body in ALL_GATED:
            if path.endswith("/events"):
                continue
            assert_granted(call(c, method, path, body, None), path)
            assert_granted(call(c, method, path, body, "anything at all"), path)


# ------------------------------------------------------------------ allowlist
@pytest.fixture
def allowlist() -> Iterator[TestClient]:
    with make_client(access_tokens="tok-one, tok-two") as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body"), ALL_GATED, ids=IDS)
def test_allowlist_refuses_missing_and_wrong_tokens(
    allowlist: TestClient, method: str, path: str, body: bytes | None
) -> None:
    assert_unauthorized(call(allowlist, method, path, body, None))
    assert_unauthorized(call(allowlist, method, path, body, "tok-three"))
    assert_unauthorized(call(allowlist, method, path, body, "tok-one-and-more"))
    assert_unauthorized(call(allowlist, method, path, body, "TOK-ONE"))
    r = allowlist.request(
        method,
        path.replace("{ws}", "alpha"),
        content=body,
        headers={"Authorization": "Basic tok-one"},
    )
    assert_unauthorized(r)
    r = allowlist.request(
        method, path.replace("{ws}", "alpha"), content=body, headers={"Authorization": "Bearer"}
    )
    assert_unauthorized(r)
    # Nothing was stored by any refused request.
    assert contents(allowlist, "alpha", "tok-one") == EMPTY
    assert allowlist.app.state.relay.store.stats_now().pairings == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "path", "body"), [g for g in ALL_GATED if not g[1].endswith("/events")]
)
def test_allowlist_grants_listed_tokens(
    allowlist: TestClient, method: str, path: str, body: bytes | None
) -> None:
    assert_granted(call(allowlist, method, path, body, "tok-one"), path)
    assert_granted(call(allowlist, method, path, body, "tok-two"), path)
    r = allowlist.request(
        method,
        path.replace("{ws}", "alpha"),
        content=body,
        headers={"Authorization": "bearer tok-two"},
    )
    assert_granted(r, path)


def test_allowlist_from_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators' tokens\n\n  file-tok-a  \nfile-tok-b\n# not-a-token\n")
    with make_client(access_tokens_file=str(tokens)) as c:
        for token in ("file-tok-a", "file-tok-b"):
            assert call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, token).status_code == 200
        for token in ("# not-a-token", "not-a-token", "# operators' tokens", ""):
            assert_unauthorized(call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, token))


def test_allowlist_env_and_file_together(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("from-file\n")
    with make_client(access_tokens="from-env", access_tokens_file=str(tokens)) as c:
        for token in ("from-env", "from-file"):
            assert call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, token).status_code == 200
        assert_unauthorized(call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, "other"))


def test_public_routes_stay_open_behind_an_allowlist(allowlist: TestClient) -> None:
    assert allowlist.get("/v1/health").text == "ok"
    assert allowlist.head("/v1/health").status_code == 200
    assert allowlist.get("/").status_code == 200
    assert allowlist.get("/openapi.json").status_code == 200
    assert allowlist.get("/metrics").status_code == 200


def test_websocket_is_gated(allowlist: TestClient) -> None:
    with pytest.raises(WebSocketDenialResponse) as denied:
        with allowlist.websocket_connect("/v1/workspaces/alpha/ws"):
            pass
    assert denied.value.status_code == 401
    assert denied.value.headers["www-authenticate"].split()[0] == "Bearer"
    with pytest.raises(WebSocketDenialResponse) as denied:
        with allowlist.websocket_connect("/v1/workspaces/alpha/ws", subprotocols=["bearer.nope"]):
            pass
    assert denied.value.status_code == 401
    with allowlist.websocket_connect(
        "/v1/workspaces/alpha/ws", headers={"Authorization": "Bearer tok-one"}
    ):
        pass
    with allowlist.websocket_connect(
        "/v1/workspaces/alpha/ws", subprotocols=["bearer.tok-two"]
    ) as s:
        assert s.accepted_subprotocol == "bearer.tok-two"


@pytest.mark.parametrize("value", [" , ,", ","])
def test_allowlist_env_without_a_token_refuses_to_start(value: str) -> None:
    with pytest.raises(SettingsError, match="HIVE_RELAY_ACCESS_TOKENS"):
        create_app(Settings(access_tokens=value))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \n# x\n"])
def test_empty_token_file_refuses_to_start(tmp_path: Path, text: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(text)
    with pytest.raises(SettingsError, match="HIVE_RELAY_ACCESS_TOKENS_FILE"):
        create_app(Settings(access_tokens_file=str(tokens)))


def test_unreadable_token_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="HIVE_RELAY_ACCESS_TOKENS_FILE"):
        create_app(Settings(access_tokens_file=str(tmp_path / "missing")))
    with pytest.raises(SettingsError, match="HIVE_RELAY_ACCESS_TOKENS_FILE"):
        create_app(Settings(access_tokens_file=str(tmp_path)))  # a directory
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00tok")
    with pytest.raises(SettingsError, match="HIVE_RELAY_ACCESS_TOKENS_FILE"):
        create_app(Settings(access_tokens_file=str(binary)))


# -------------------------------------------------------------- signed tokens
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(key: Ed25519PrivateKey, claims: dict[str, Any] | bytes, prefix: str = "hrt1") -> str:
    """A token made from PROTOCOL.md's description, independently of relay.access."""
    raw = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    head = f"{prefix}.{b64url(raw)}"
    return f"{head}.{b64url(key.sign(head.encode('ascii')))}"


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signed(key: Ed25519PrivateKey) -> Iterator[TestClient]:
    with make_client(token_pubkey=public_bytes(key).hex()) as c:
        yield c


def test_signed_token_without_ws_claim_grants_every_workspace(
    signed: TestClient, key: Ed25519PrivateKey
) -> None:
    token = sign(key, {"sub": "alice", "exp": 0})
    for ws in ("alpha", "beta", "x" * 200):
        for method, path, body in ALL_GATED:
            if not path.endswith("/events"):
                assert_granted(call(signed, method, path, body, token, ws=ws), path)


@pytest.mark.parametrize(
    "encode",
    [
        lambda raw: raw.hex(),
        lambda raw: raw.hex().upper(),
        lambda raw: base64.b64encode(raw).decode(),
        b64url,
    ],
    ids=["hex", "HEX", "base64", "base64url"],
)
def test_public_key_as_hex_or_base64(key: Ed25519PrivateKey, encode: Any) -> None:
    with make_client(token_pubkey=encode(public_bytes(key))) as c:
        token = sign(key, {"sub": "s"})
        assert call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, token).status_code == 200
        assert_unauthorized(call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, None))


@pytest.mark.parametrize(
    ("method", "path", "body"), WS_GATED, ids=[f"{m} {p}" for m, p, _ in WS_GATED]
)
def test_ws_claim_limits_the_token_to_its_workspaces(
    signed: TestClient, key: Ed25519PrivateKey, method: str, path: str, body: bytes | None
) -> None:
    token = sign(key, {"sub": "bob", "exp": 0, "ws": ["alpha", "team-*"]})
    everything = sign(key, {"sub": "admin"})
    for ws in ("beta", "alphabet", "alph", "team", "Team-1", "xteam-1"):
        assert_forbidden(call(signed, method, path, body, token, ws=ws))
        assert contents(signed, ws, everything) == EMPTY
    if not path.endswith("/events"):
        for ws in ("alpha", "team-1", "team-", "team-x:y@z"):
            assert_granted(call(signed, method, path, body, token, ws=ws), path)


def test_scoped_token_may_use_pairing(signed: TestClient, key: Ed25519PrivateKey) -> None:
    token = sign(key, {"sub": "bob", "ws": ["alpha"]})
    r = call(signed, "POST", "/v1/pair", b'{"payload":"p"}', token)
    assert r.status_code == 200
    assert call(signed, "GET", f"/v1/pair/{r.json()['code']}", None, token).json() == {
        "payload": "p"
    }


def test_scoped_token_on_websocket(signed: TestClient, key: Ed25519PrivateKey) -> None:
    token = sign(key, {"sub": "bob", "ws": ["alpha"]})
    with pytest.raises(WebSocketDenialResponse) as denied:
        with signed.websocket_connect("/v1/workspaces/beta/ws", subprotocols=[f"bearer.{token}"]):
            pass
    assert denied.value.status_code == 403
    with signed.websocket_connect("/v1/workspaces/alpha/ws", subprotocols=[f"bearer.{token}"]):
        pass


def test_unknown_claims_are_ignored(signed: TestClient, key: Ed25519PrivateKey) -> None:
    token = sign(
        key,
        {
            "sub": "carol",
            "plan": "pro",
            "exp": 0,
            "max_members": 5,
            "retention_days": 30,
            "turn": {"urls": ["turn:x"]},
            "caps": ["a", "b"],
            "future_claim": {"nested": [1, 2]},
        },
    )
    assert call(signed, "POST", "/v1/workspaces/{ws}/envelopes", b"1", token).status_code == 200


def test_exp_in_the_past_is_401_and_in_the_future_is_accepted(
    signed: TestClient, key: Ed25519PrivateKey
) -> None:
    expired = sign(key, {"sub": "s", "exp": int(time.time()) - 60})
    r = call(signed, "POST", "/v1/workspaces/{ws}/envelopes", b"1", expired)
    assert_unauthorized(r)
    assert contents(signed, "alpha", sign(key, {"sub": "s"})) == EMPTY
    fresh = sign(key, {"sub": "s", "exp": int(time.time()) + 3600})
    assert call(signed, "POST", "/v1/workspaces/{ws}/envelopes", b"1", fresh).status_code == 200
    never = sign(key, {"sub": "s", "exp": 0})
    assert call(signed, "GET", "/v1/workspaces/{ws}/envelopes", None, never).status_code == 200


def test_a_token_stops_working_when_it_expires(
    signed: TestClient, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    clock = SimpleNamespace(time=lambda: now)
    monkeypatch.setattr(relay.access, "time", clock)
    token = sign(key, {"sub": "s", "exp": int(now) + 100})
    assert call(signed, "GET", "/v1/workspaces/{ws}/envelopes", None, token).status_code == 200
    clock.time = lambda: now + 101  # type: ignore[assignment]  # verified tokens are cached; expiry still counts
    assert_unauthorized(call(signed, "GET", "/v1/workspaces/{ws}/envelopes", None, token))


def _malformed(key: Ed25519PrivateKey) -> dict[str, str]:
    other = Ed25519PrivateKey.generate()
    good = sign(key, {"sub": "s"})
    prefix, claims, sig = good.split(".")
    evil_claims = b64url(json.dumps({"sub": "s", "ws": None, "admin": True}).encode())
    return {
        "not_hrt1": "just-a-string",
        "two_parts": f"{prefix}.{claims}",
        "four_parts": f"{good}.extra",
        "wrong_prefix_signed": sign(key, {"sub": "s"}, prefix="hrt2"),
        "uppercase_prefix": f"HRT1.{claims}.{sig}",
        "bad_base64": f"{prefix}.!!!.{sig}",
        "bad_sig_base64": f"{prefix}.{claims}.%%%",
        "empty_sig": f"{prefix}.{claims}.",
        "truncated_sig": f"{prefix}.{claims}.{sig[:-4]}",
        "other_key": sign(other, {"sub": "s"}),
        "tampered_claims": f"{prefix}.{evil_claims}.{sig}",
        "claims_not_json": sign(key, b"not json"),
        "claims_array": sign(key, b'["sub"]'),
        "claims_string": sign(key, b'"s"'),
        "exp_string": sign(key, {"sub": "s", "exp": "never"}),
        "exp_negative": sign(key, {"sub": "s", "exp": -1}),
        "exp_float": sign(key, {"sub": "s", "exp": 1.5e12}),
        "exp_bool": sign(key, {"sub": "s", "exp": True}),
        "ws_number": sign(key, {"sub": "s", "ws": 5}),
        "ws_list_of_numbers": sign(key, {"sub": "s", "ws": [1, 2]}),
        "ws_empty_entry": sign(key, {"sub": "s", "ws": [""]}),
        "non_ascii": f"{prefix}.{claims}é.{sig}",
    }


MALFORMED_IDS = list(_malformed(Ed25519PrivateKey.generate()))


@pytest.mark.parametrize("name", MALFORMED_IDS)
def test_malformed_tokens_are_401(signed: TestClient, key: Ed25519PrivateKey, name: str) -> None:
    token = _malformed(key)[name]
    r = call(signed, "POST", "/v1/workspaces/{ws}/envelopes", b"1", token)
    assert_unauthorized(r)
    assert contents(signed, "alpha", sign(key, {"sub": "s"})) == EMPTY


def _respelled(key: Ed25519PrivateKey) -> tuple[str, dict[str, str]]:
    """A valid token whose signature uses `-` or `_`, and other spellings of its signature
    that a lenient base64 decoder reads as the same bytes (issue 18 §7)."""
    n = 0
    while True:
        good = sign(key, {"sub": "s", "n": n})
        prefix, claims, sig = good.split(".")
        if "-" in sig or "_" in sig:
            break
        n += 1
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1])
    # 64 bytes are 86 characters; the last carries 4 bits and 2 unused ones.
    other_last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1]
    std = sig.replace("-", "+").replace("_", "/")
    return good, {
        "padding_then_junk": f"{prefix}.{claims}.{sig}==junk",
        "padding": f"{prefix}.{claims}.{sig}==",
        "extra_padding_and_As": f"{prefix}.{claims}.{sig}==A=A==",
        "four_spaces": f"{prefix}.{claims}.{sig[:10]}    {sig[10:]}",
        "four_tabs": f"{prefix}.{claims}.{sig[:10]}\t\t\t\t{sig[10:]}",
        "standard_alphabet": f"{prefix}.{claims}.{std}",
        "unused_bits_set": f"{prefix}.{claims}.{sig[:-1]}{other_last}",
        "padded_claims": f"{prefix}.{claims}{'=' * (-len(claims) % 4) or '=='}.{sig}",
    }


RESPELLED_IDS = list(_respelled(Ed25519PrivateKey.generate())[1])


@pytest.mark.parametrize("name", RESPELLED_IDS)
def test_a_token_has_one_spelling(signed: TestClient, key: Ed25519PrivateKey, name: str) -> None:
    good, spellings = _respelled(key)
    assert spellings[name] != good
    assert call(signed, "GET", "/v1/workspaces/{ws}/envelopes", None, good).status_code == 200
    r = call(signed, "POST", "/v1/workspaces/{ws}/envelopes", b"1", spellings[name])
    assert_unauthorized(r)
    assert "base64url" in r.json()["message"]
    assert contents(signed, "alpha", good) == EMPTY


def test_b64url_decode_takes_only_the_canonical_spelling() -> None:
    for data in (b"", b"\x00", b"\xff\xfe", b"abc", bytes(range(64))):
        text = b64url(data)
        assert relay.access.b64url_decode(text) == data
        for bad in (text + "=", text + " ", "=" + text, text + "\t", text.replace("_", "/") + "/"):
            if bad != text:
                with pytest.raises(ValueError):
                    relay.access.b64url_decode(bad)


def test_signed_tokens_win_over_the_allowlist(key: Ed25519PrivateKey) -> None:
    with make_client(token_pubkey=public_bytes(key).hex(), access_tokens="static") as c:
        assert_unauthorized(call(c, "GET", "/v1/workspaces/{ws}/envelopes", None, "static"))
        assert (
            call(
                c, "GET", "/v1/workspaces/{ws}/envelopes", None, sign(key, {"sub": "s"})
            ).status_code
            == 200
        )


@pytest.mark.parametrize(
    "value",
    ["zz" * 32, "abc", "00" * 31, "00" * 33, base64.b64encode(b"\x01" * 31).decode(), "not a key!"],
)
def test_unusable_public_key_refuses_to_start(value: str) -> None:
    with pytest.raises(SettingsError, match="HIVE_RELAY_TOKEN_PUBKEY"):
        create_app(Settings(token_pubkey=value))


# --------------------------------------------------------- the operator's CLI
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "token", *args],
        cwd=REPO,
        env=relay_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def keygen() -> tuple[str, str]:
    out = run_cli("keygen")
    assert out.returncode == 0, out.stderr
    private = public = ""
    for line in out.stdout.splitlines():
        if line.startswith("private key"):
            private = line.rsplit(" ", 1)[1]
        elif "HIVE_RELAY_TOKEN_PUBKEY=" in line:
            public = line.split("HIVE_RELAY_TOKEN_PUBKEY=", 1)[1].strip()
    assert len(private) == 64 and len(public) == 64, out.stdout
    bytes.fromhex(private)
    bytes.fromhex(public)
    return private, public


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(relay.access.b64url_decode(token.split(".")[1]))
    return claims


@pytest.mark.slow
def test_cli_keygen_prints_a_fresh_key_pair() -> None:
    first = keygen()
    second = keygen()
    assert first != second
    private, public = first
    derived = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(private)).public_key()
    assert derived.public_bytes(Encoding.Raw, PublicFormat.Raw).hex() == public


@pytest.mark.slow
def test_cli_issue_prints_a_signed_token(tmp_path: Path) -> None:
    private, public = keygen()
    before = int(time.time())
    out = run_cli(
        "issue",
        "--key",
        private,
        "--sub",
        "alice",
        "--ws",
        "alpha",
        "--ws",
        "team-*",
        "--exp-days",
        "1",
    )
    after = int(time.time()) + 1
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "\n" not in token
    prefix, claims_b64, sig_b64 = token.split(".")
    assert prefix == "hrt1"
    assert "=" not in token
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
        relay.access.b64url_decode(sig_b64), f"hrt1.{claims_b64}".encode("ascii")
    )
    claims = claims_of(token)
    assert claims["sub"] == "alice"
    assert claims["ws"] == ["alpha", "team-*"]
    assert before + 86400 <= claims["exp"] <= after + 86400

    # --key @FILE, no --exp-days: never expires, no ws claim.
    key_file = tmp_path / "signing.key"
    key_file.write_text(private + "\n")
    out = run_cli("issue", "--key", f"@{key_file}", "--sub", "bob", "--plan", "pro")
    assert out.returncode == 0, out.stderr
    claims = claims_of(out.stdout.strip())
    assert claims["sub"] == "bob"
    assert claims["exp"] == 0
    assert claims.get("plan") == "pro"
    assert "ws" not in claims


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--key", "not-a-key", "--sub", "x"], "--key"),
        (["--key", "@/nonexistent/hive-relay.key", "--sub", "x"], "--key"),
        (["--key", "00" * 32, "--sub", "x", "--exp-days", "-1"], "--exp-days"),
    ],
)
def test_cli_issue_errors_are_one_line(args: list[str], names: str) -> None:
    out = run_cli("issue", *args)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert names in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_token_end_to_end_against_a_real_relay() -> None:
    private, public = keygen()
    issued = run_cli("issue", "--key", private, "--sub", "e2e", "--ws", "alpha", "--exp-days", "1")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    with RelayProcess(env={"HIVE_RELAY_TOKEN_PUBKEY": public, "HIVE_RELAY_PUSH_RATE": "0"}) as proc:
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            r = http.post("/v1/workspaces/alpha/envelopes", content=b'{"hello":1}', headers=auth)
            assert r.status_code == 200, r.text
            seq = r.json()["seq"]
            r = http.get("/v1/workspaces/alpha/envelopes", headers=auth)
            assert r.content == b'[{"seq":%d,"body":{"hello":1}}]' % seq
            r = http.post("/v1/workspaces/beta/envelopes", content=b"1", headers=auth)
            assert r.status_code == 403
            assert r.json()["error"] == "forbidden"
            r = http.get("/v1/workspaces/alpha/envelopes")
            assert r.status_code == 401
            assert r.headers["www-authenticate"].split()[0] == "Bearer"
            other = run_cli("issue", "--key", keygen()[0], "--sub", "intruder").stdout.strip()
            r = http.get(
                "/v1/workspaces/alpha/envelopes", headers={"Authorization": f"Bearer {other}"}
            )
            assert r.status_code == 401
            assert http.get("/v1/health").text == "ok"
    logs = proc.logs()
    assert token not in logs
    assert token.split(".")[2] not in logs
