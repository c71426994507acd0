"""Who may touch which workspace: open, static allowlist, or signed hrt1 tokens.

The policy is resolved once at start-up (`policy_from_settings`), most specific
first. A setting that is present but unusable raises SettingsError: the relay
never starts more open than the operator asked for. Handlers never parse
tokens: `relay.api.common.authorize` takes the bearer token from the request,
asks `policy.authenticate(token)` for a `Grant`, and the grant says whether it
`allows(workspace)`.

Tokens are compared by their SHA-256 digest (a dictionary lookup on the
digest reveals nothing about the secret), never logged, never used as labels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from relay.settings import Settings, SettingsError

TOKEN_PREFIX = "hrt1"


class Denied(Exception):
    """401 (no or bad credentials) or 403 (valid, but not for this workspace)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def unauthorized(message: str = "a valid bearer token is required") -> Denied:
    return Denied(401, "unauthorized", message)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request is allowed: every workspace, or those matching `scopes`.

    `expires` is the token's `exp` (Unix seconds; 0 = never): a live stream
    opened with the grant ends when it passes.
    """

    subject: str = ""
    scopes: tuple[str, ...] | None = None  # None = every workspace
    expires: int = 0

    def allows(self, ws: str) -> bool:
        if self.scopes is None:
            return True
        for scope in self.scopes:
            if scope.endswith("*"):
                if ws.startswith(scope[:-1]):
                    return True
            elif ws == scope:
                return True
        return False


OPEN_GRANT = Grant()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class AccessPolicy(Protocol):
    name: str

    def authenticate(self, token: str | None) -> Grant:
        """The grant for a token, or raise Denied(401)."""
        ...


class OpenPolicy:
    name = "open"

    def authenticate(self, token: str | None) -> Grant:
        return OPEN_GRANT


class AllowlistPolicy:
    name = "allowlist"

    def __init__(self, tokens: list[str]) -> None:
        self._digests = {hashlib.sha256(t.encode()).digest() for t in tokens}

    def authenticate(self, token: str | None) -> Grant:
        if token is None:
            raise unauthorized()
        if hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest() not in self._digests:
            raise unauthorized("the bearer token is not accepted by this relay")
        return OPEN_GRANT


@dataclass(slots=True)
class _Verified:
    grant: Grant
    exp: int
    nbf: int = 0


@dataclass
class SignedTokenPolicy:
    """Ed25519-signed `hrt1.<b64url(claims)>.<b64url(sig)>` tokens."""

    public_keys: list[Ed25519PublicKey]
    name: str = "signed"
    cache_size: int = 10_000
    # Verified tokens by digest, so a busy device does not cost a signature check per request.
    _cache: OrderedDict[bytes, _Verified] = field(default_factory=OrderedDict)

    def authenticate(self, token: str | None) -> Grant:
        if token is None:
            raise unauthorized()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        hit = self._cache.get(digest)
        if hit is None:
            hit = self._verify(token)
            self._cache[digest] = hit
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        now = time.time()
        if hit.exp and hit.exp <= now:
            raise unauthorized("the bearer token has expired")
        if hit.nbf > now:
            raise unauthorized("the bearer token is not valid yet (its nbf is in the future)")
        return hit.grant

    def _verify(self, token: str) -> _Verified:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise unauthorized("the bearer token is not an hrt1 token")
        try:
            claims_raw = b64url_decode(parts[1])
            sig = b64url_decode(parts[2])
        except ValueError:
            raise unauthorized("the bearer token is not valid base64url") from None
        try:
            signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        except UnicodeEncodeError:
            raise unauthorized("the bearer token is not an hrt1 token") from None
        # Several keys during a rotation: a token signed by any of them is valid.
        for key in self.public_keys:
            try:
                key.verify(sig, signed)
                break
            except InvalidSignature:
                continue
        else:
            raise unauthorized("the bearer token's signature does not verify")
        try:
            claims = json.loads(claims_raw)
        except ValueError:
            raise unauthorized("the bearer token's claims are not JSON") from None
        if not isinstance(claims, dict):
            raise unauthorized("the bearer token's claims are not a JSON object")
        exp = _time_claim(claims, "exp")
        nbf = _time_claim(claims, "nbf")
        scopes = _scopes(claims.get("ws"))
        sub = claims.get("sub")
        return _Verified(Grant(sub if isinstance(sub, str) else "", scopes, exp), exp, nbf)


def _time_claim(claims: dict[str, Any], name: str) -> int:
    """`exp` or `nbf`: Unix seconds as a non-negative integer; absent or null = 0."""
    value = claims.get(name, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise unauthorized(f"the bearer token's {name} claim is not a non-negative integer")
    return value


def _scopes(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise unauthorized("the bearer token's ws claim is not a list of workspace ids")
    return tuple(value)


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(text: str) -> bytes:
    """Decode canonical base64url without padding, the only spelling a token may use.

    Anything else raises ValueError: `=` padding, characters outside A–Z a–z 0–9
    `-` `_` (so the standard alphabet's `+` `/`, spaces, tabs), a length no
    encoding has, and non-zero unused bits in the last character (`...AB` and
    `...AC` decode alike). Each token thus has exactly one spelling, so another
    spelling can neither pass nor miss the verification cache.
    """
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise ValueError("not canonical base64url without padding")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None
    if b64url_encode(raw) != text:
        raise ValueError("not canonical base64url without padding")
    return raw


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse_key_bytes(text: str, setting: str) -> bytes:
    """32 key bytes from 64 hex characters or base64 / base64url (padded or not)."""
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 64:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            std = text.replace("-", "+").replace("_", "/")
            raw = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise SettingsError(f"{setting}: not a 32-byte Ed25519 key as 64 hex characters or base64")
    return raw


def policy_from_settings(settings: Settings) -> AccessPolicy:
    if settings.token_pubkey.strip():
        keys = []
        for part in settings.token_pubkey.split(","):
            if not part.strip():
                continue
            raw = parse_key_bytes(part, "HIVE_RELAY_TOKEN_PUBKEY")
            try:
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
            except ValueError:
                raise SettingsError(
                    "HIVE_RELAY_TOKEN_PUBKEY: not a usable Ed25519 public key"
                ) from None
        return SignedTokenPolicy(keys)
    tokens: list[str] = []
    if settings.access_tokens.strip():
        tokens += [t.strip() for t in settings.access_tokens.split(",") if t.strip()]
        if not tokens:
            raise SettingsError("HIVE_RELAY_ACCESS_TOKENS: set but holds no token")
    if settings.access_tokens_file.strip():
        path = Path(settings.access_tokens_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"HIVE_RELAY_ACCESS_TOKENS_FILE: cannot read {str(path)!r}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        from_file = [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
        if not from_file:
            raise SettingsError(
                f"HIVE_RELAY_ACCESS_TOKENS_FILE: {str(path)!r} holds no token "
                "(refusing to start an open relay)"
            )
        tokens += from_file
    if tokens:
        return AllowlistPolicy(tokens)
    return OpenPolicy()


def ignored_settings(settings: Settings) -> list[str]:
    """Access settings that are set but shadowed by a more specific one."""
    if settings.token_pubkey.strip():
        return [
            name
            for name, value in (
                ("HIVE_RELAY_ACCESS_TOKENS", settings.access_tokens),
                ("HIVE_RELAY_ACCESS_TOKENS_FILE", settings.access_tokens_file),
            )
            if value.strip()
        ]
    return []


# ------------------------------------------------------------ operator tools
def generate_keypair() -> tuple[str, str]:
    """(private key hex, public key hex) for signing tokens."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return private, public


def issue_token(
    private_key: bytes,
    sub: str,
    exp: int = 0,
    ws: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": exp}
    if ws:
        claims["ws"] = ws
    claims.update(extra or {})
    body = b64url_encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{TOKEN_PREFIX}.{body}"
    sig = Ed25519PrivateKey.from_private_bytes(private_key).sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(sig)}"
