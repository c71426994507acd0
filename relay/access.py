"""Who may touch which workspace: open, static allowlist, or signed hrt1 tokens.

The policy is resolved at start-up (`access_from_settings`), most specific
first. A setting that is present but unusable raises SettingsError: the relay
never starts more open than the operator asked for. The files behind it (the
allowlist, the signing keys, the revocations) are read again on a reload
(relay/reload.py): each part is replaced whole, and a new policy object is
built from the parts, so a request sees either the old policy or the new one. Handlers never parse
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
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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


REVOKED_MESSAGE = "the bearer token has been revoked"


def revoked() -> Denied:
    return Denied(401, "token_revoked", REVOKED_MESSAGE)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request is allowed: every workspace, or those matching `scopes`.

    `expires` is the token's `exp` (Unix seconds; 0 = never): a live stream
    opened with the grant ends when it passes.
    """

    subject: str = ""
    scopes: tuple[str, ...] | None = None  # None = every workspace
    expires: int = 0
    jti: str = ""  # the token's id, for revocation ("" = none)

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


@dataclass(frozen=True)
class Revocations:
    """Revoked signed tokens: by token id (`jti`) and by subject (`sub:NAME` lines)."""

    jtis: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.jtis) + len(self.subjects)

    def revokes(self, grant: Grant) -> bool:
        return (bool(grant.jti) and grant.jti in self.jtis) or (
            bool(grant.subject) and grant.subject in self.subjects
        )


NO_REVOCATIONS = Revocations()


@dataclass(slots=True)
class _Verified:
    grant: Grant
    exp: int
    nbf: int = 0


@dataclass
class SignedTokenPolicy:
    """Ed25519-signed `hrt1.<b64url(claims)>.<b64url(sig)>` tokens."""

    public_keys: list[Ed25519PublicKey]
    revocations: Revocations = NO_REVOCATIONS
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
        if self.revocations and self.revocations.revokes(hit.grant):
            raise revoked()
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
        jti = claims.get("jti")
        grant = Grant(
            sub if isinstance(sub, str) else "", scopes, exp, jti if isinstance(jti, str) else ""
        )
        return _Verified(grant, exp, nbf)

    def with_revocations(self, revocations: Revocations) -> SignedTokenPolicy:
        """The same keys with another revocation list; the verification cache is shared
        (a cached entry records a signature check, which a revocation does not change)."""
        return replace(self, revocations=revocations)


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


SUBJECT_PREFIX = "sub:"
# A revocation entry as `token revoke` accepts it: no spaces, no leading '#'.
_ENTRY = re.compile(r"[^\s#][^\s]*")


def revocation_entry_error(entry: str) -> str | None:
    """Why `entry` is not a jti or `sub:NAME`, or None when it is one."""
    if not _ENTRY.fullmatch(entry):
        return "not a token id or sub:NAME (no spaces, not starting with #)"
    if entry.startswith(SUBJECT_PREFIX) and len(entry) == len(SUBJECT_PREFIX):
        return "sub: needs a subject name"
    return None


def _read_text(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(
            f"{setting}: cannot read {str(path)!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, content) of each line that is not blank or a `#` comment.

    A `#` after whitespace starts a comment too (`jti  # alice's laptop`).
    """
    for number, line in enumerate(text.splitlines(), 1):
        content = re.split(r"\s#", line, maxsplit=1)[0].strip()
        if content and not content.startswith("#"):
            yield number, content


def read_token_file(path: str, reloading: bool = False) -> tuple[str, ...]:
    """The allowlist file's tokens; SettingsError when unreadable or holding none.

    On a reload (`reloading`) a file whose last line has no newline is taken as
    still being written: the caller keeps the tokens it has.
    """
    setting = "HIVE_RELAY_ACCESS_TOKENS_FILE"
    text = _read_text(Path(path), setting)
    tokens = tuple(content for _, content in _lines(text))
    if not tokens:
        raise SettingsError(
            f"{setting}: {path!r} holds no token (refusing to start an open relay)"
            if not reloading
            else f"{setting}: {path!r} holds no token (an empty allowlist would refuse everyone)"
        )
    if reloading and not text.endswith("\n"):
        raise SettingsError(
            f"{setting}: {path!r} does not end with a newline: it looks half-written "
            "(write it whole, ending in a newline, or write a new file and rename it)"
        )
    return tokens


def parse_public_key(text: str, setting: str) -> Ed25519PublicKey:
    raw = parse_key_bytes(text, setting)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SettingsError(f"{setting}: not a usable Ed25519 public key") from None


def read_key_file(path: str) -> tuple[Ed25519PublicKey, ...]:
    """The public keys in HIVE_RELAY_TOKEN_PUBKEY_FILE: one per line, `#` comments.

    Every line must be a key: one that is not fails the whole file (a typo
    must not silently drop a key the operator meant to keep).
    """
    setting = "HIVE_RELAY_TOKEN_PUBKEY_FILE"
    keys = []
    for number, content in _lines(_read_text(Path(path), setting)):
        keys.append(parse_public_key(content, f"{setting}: {path!r} line {number}"))
    if not keys:
        raise SettingsError(f"{setting}: {path!r} holds no public key")
    return tuple(keys)


def read_revocations(path: str) -> Revocations:
    """HIVE_RELAY_REVOKED_TOKENS_FILE: a jti or `sub:NAME` per line, `#` comments.

    An empty file revokes nothing and is valid; a missing one is an error (a
    misspelt path must not mean "nothing is revoked").
    """
    setting = "HIVE_RELAY_REVOKED_TOKENS_FILE"
    jtis: set[str] = set()
    subjects: set[str] = set()
    for number, content in _lines(_read_text(Path(path), setting)):
        problem = revocation_entry_error(content)
        if problem is not None:
            raise SettingsError(f"{setting}: {path!r} line {number}: {problem}")
        if content.startswith(SUBJECT_PREFIX):
            subjects.add(content[len(SUBJECT_PREFIX) :])
        else:
            jtis.add(content)
    return Revocations(frozenset(jtis), frozenset(subjects))


@dataclass(frozen=True)
class AccessState:
    """What the access policy is made of. A reload replaces one part and calls `policy()`.

    The mode is fixed at start: a reload changes who is let in, never whether
    the relay is gated.
    """

    mode: str  # "open", "allowlist" or "signed"
    static_tokens: tuple[str, ...] = ()  # HIVE_RELAY_ACCESS_TOKENS
    file_tokens: tuple[str, ...] = ()  # HIVE_RELAY_ACCESS_TOKENS_FILE
    static_keys: tuple[Ed25519PublicKey, ...] = ()  # HIVE_RELAY_TOKEN_PUBKEY
    file_keys: tuple[Ed25519PublicKey, ...] = ()  # HIVE_RELAY_TOKEN_PUBKEY_FILE
    revocations: Revocations = NO_REVOCATIONS  # HIVE_RELAY_REVOKED_TOKENS_FILE

    def policy(self) -> AccessPolicy:
        if self.mode == "signed":
            return SignedTokenPolicy([*self.static_keys, *self.file_keys], self.revocations)
        if self.mode == "allowlist":
            return AllowlistPolicy([*self.static_tokens, *self.file_tokens])
        return OpenPolicy()

    def describe(self) -> str:
        """One line for logs and check-config: the mode and its counts, never a secret."""
        if self.mode == "signed":
            return (
                f"signed ({len(self.static_keys) + len(self.file_keys)} public key(s), "
                f"{len(self.revocations.jtis)} revoked token id(s), "
                f"{len(self.revocations.subjects)} revoked subject(s))"
            )
        if self.mode == "allowlist":
            return f"allowlist ({len(set(self.static_tokens) | set(self.file_tokens))} token(s))"
        return "open"


def access_from_settings(settings: Settings) -> AccessState:
    if settings.token_pubkey.strip() or settings.token_pubkey_file.strip():
        static_keys = tuple(
            parse_public_key(part, "HIVE_RELAY_TOKEN_PUBKEY")
            for part in settings.token_pubkey.split(",")
            if part.strip()
        )
        file_keys: tuple[Ed25519PublicKey, ...] = ()
        if settings.token_pubkey_file.strip():
            file_keys = read_key_file(settings.token_pubkey_file)
        revocations = NO_REVOCATIONS
        if settings.revoked_tokens_file.strip():
            revocations = read_revocations(settings.revoked_tokens_file)
        return AccessState(
            "signed", static_keys=static_keys, file_keys=file_keys, revocations=revocations
        )
    tokens: tuple[str, ...] = ()
    if settings.access_tokens.strip():
        tokens = tuple(t.strip() for t in settings.access_tokens.split(",") if t.strip())
        if not tokens:
            raise SettingsError("HIVE_RELAY_ACCESS_TOKENS: set but holds no token")
    from_file: tuple[str, ...] = ()
    if settings.access_tokens_file.strip():
        from_file = read_token_file(settings.access_tokens_file)
    if tokens or from_file:
        return AccessState("allowlist", static_tokens=tokens, file_tokens=from_file)
    return AccessState("open")


def policy_from_settings(settings: Settings) -> AccessPolicy:
    return access_from_settings(settings).policy()


def ignored_settings(settings: Settings) -> list[tuple[str, str]]:
    """(setting, why) for access settings that are set but have no effect."""
    signed = bool(settings.token_pubkey.strip() or settings.token_pubkey_file.strip())
    out = []
    if signed:
        for name, value in (
            ("HIVE_RELAY_ACCESS_TOKENS", settings.access_tokens),
            ("HIVE_RELAY_ACCESS_TOKENS_FILE", settings.access_tokens_file),
        ):
            if value.strip():
                out.append((name, "a signing key selects signed tokens"))
    elif settings.revoked_tokens_file.strip():
        out.append(("HIVE_RELAY_REVOKED_TOKENS_FILE", "revocation applies to signed tokens only"))
    return out


# ------------------------------------------------------------ live streams
@dataclass(eq=False, slots=True)
class _Open:
    token: str | None
    ws: str
    end: Callable[[Denied], None]


class OpenStreams:
    """Every live stream (SSE, WebSocket, long-poll) with the token that opened it.

    After a reload, `recheck(policy)` asks the new policy about each token and
    ends the streams it no longer accepts for their workspace; the others are
    untouched. Tokens are held in memory as the requests held them, never logged.
    """

    def __init__(self) -> None:
        self._open: set[_Open] = set()
        # Bumped by every recheck: a stream authorized under an older generation
        # (it awaited something between its check and `hold`) is checked again.
        self.generation = 0
        self._policy: AccessPolicy | None = None

    def __len__(self) -> int:
        return len(self._open)

    @contextmanager
    def hold(
        self,
        token: str | None,
        ws: str,
        end: Callable[[Denied], None],
        since: int | None = None,
    ) -> Iterator[None]:
        """Hold a stream for its life. `since`: the generation when its token was checked."""
        entry = _Open(token, ws, end)
        self._open.add(entry)
        try:
            if since is not None and since != self.generation and self._policy is not None:
                denied = _refusal(self._policy, token, ws)
                if denied is not None:
                    self._open.discard(entry)
                    end(denied)
            yield
        finally:
            self._open.discard(entry)

    def recheck(self, policy: AccessPolicy) -> int:
        """End the streams `policy` refuses; how many were ended."""
        self.generation += 1
        self._policy = policy
        refused: list[tuple[_Open, Denied]] = []
        # Many streams share a token (a device's SSE and WebSocket): ask once per pair.
        verdicts: dict[tuple[str | None, str], Denied | None] = {}
        for entry in self._open:
            key = (entry.token, entry.ws)
            if key not in verdicts:
                verdicts[key] = _refusal(policy, entry.token, entry.ws)
            denied = verdicts[key]
            if denied is not None:
                refused.append((entry, denied))
        for entry, denied in refused:
            self._open.discard(entry)
            entry.end(denied)
        return len(refused)


def _refusal(policy: AccessPolicy, token: str | None, ws: str | None) -> Denied | None:
    """Why `policy` refuses `token` (for `ws`, when given), or None when it accepts it."""
    try:
        grant = policy.authenticate(token)
    except Denied as exc:
        return exc
    if ws is not None and not grant.allows(ws):
        return Denied(403, "forbidden", "the bearer token does not grant this workspace")
    return None


# ------------------------------------------------------------ operator tools
def generate_keypair() -> tuple[str, str]:
    """(private key hex, public key hex) for signing tokens."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return private, public


def new_token_id() -> str:
    """A token id: 96 random bits, base64url (16 characters)."""
    return secrets.token_urlsafe(12)


def token_id(token: str) -> str:
    """The `jti` claim of a token this relay's tools issued (unverified), or ""."""
    try:
        claims = json.loads(b64url_decode(token.split(".")[1]))
    except (IndexError, ValueError):
        return ""
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) else ""


def issue_token(
    private_key: bytes,
    sub: str,
    exp: int = 0,
    ws: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    jti: str | None = None,
) -> str:
    """A signed token; it carries a unique `jti` (`new_token_id()` unless given)."""
    claims: dict[str, Any] = {"sub": sub, "exp": exp, "jti": jti or new_token_id()}
    if ws:
        claims["ws"] = ws
    claims.update(extra or {})
    body = b64url_encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{TOKEN_PREFIX}.{body}"
    sig = Ed25519PrivateKey.from_private_bytes(private_key).sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(sig)}"
