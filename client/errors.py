"""Every exception the SDK raises, so a program can branch on what went wrong.

Two families under one root, `HiveError`:

* `RelayError` and its subclasses: the relay answered with an error status,
  answered something malformed, or could not be reached. Each carries the HTTP
  status, the relay's snake_case error code and its message.
* `CryptoError` and its subclasses: a body could not be sealed or opened.
"""

from __future__ import annotations


class HiveError(Exception):
    """Root of every error the SDK raises on purpose."""


class ConfigError(HiveError, ValueError):
    """A setting (argument or environment variable) is missing or unusable; the message names it."""


# --------------------------------------------------------------------------- relay


class RelayError(HiveError):
    """The relay refused a request, answered nonsense, or could not be reached.

    `status` is the HTTP status (None when no answer arrived), `code` the relay's
    snake_case error code (`{"error": code}`), `message` its sentence, and
    `retry_after` the seconds from a `Retry-After` header, when one came.
    """

    #: Whether repeating the same request later may succeed.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class BadRequest(RelayError):
    """400: the relay rejected the request as malformed (bad workspace id, invalid JSON…)."""


class Unauthorized(RelayError):
    """401: the relay needs an access token and the one sent (if any) is not valid.

    `token_sent` says which: False when this client sent no token at all, True
    when the relay rejected the one sent (None when not known).
    """

    token_sent: bool | None = None


class Forbidden(RelayError):
    """403: the token is valid but does not grant this workspace."""


class NotFound(RelayError):
    """404: unknown path (an older relay without this feature) or unknown/expired pairing code."""


class PayloadTooLarge(RelayError):
    """413: the body (or a side-channel entry) is over the relay's configured bound.

    Also raised before sending, with `status` None, when the request body is
    over the client's `max_body_bytes` (the relay's limit as the client knows it).
    """


class RelayFull(PayloadTooLarge):
    """413 `relay_full`: the relay's memory budget has no room for a new workspace (or for
    more keyring/presence/candidate data).

    Not the body's size: a smaller body does not help. Only the relay's operator can
    (a larger HIVE_RELAY_MAX_BYTES), or the relay frees room as other data expires.
    A subclass of `PayloadTooLarge`, the class a 413 had before this code existed.
    """


class RateLimited(RelayError):
    """429: too many requests; `retry_after` says when to try again."""

    retryable = True


class Unavailable(RelayError):
    """503 (or another 5xx): the relay or its store cannot serve now; `retry_after` may say when."""

    retryable = True


class Unreachable(RelayError):
    """No answer: connection refused or dropped, DNS failure or timeout. `status` is None."""

    retryable = True


class BadResponse(RelayError):
    """The relay answered, but not in the shape the protocol promises."""


class Unsupported(RelayError):
    """The relay does not offer this extension (404/405, or not an event stream).

    Raised by `events()`; the workspace object catches it to fall back to the
    next-best transport.
    """


# --------------------------------------------------------------------------- crypto


class CryptoError(HiveError):
    """A body or key-rotation blob could not be sealed or opened."""


class NotSealed(CryptoError):
    """The body is valid JSON but not a sealed envelope (no `ciphertext`): a plaintext envelope."""


class BadEnvelope(CryptoError):
    """The body claims to be sealed but its fields are malformed (or it is not JSON)."""


class DecryptError(CryptoError):
    """Authentication failed: wrong key, a tampered body, or a body moved between workspaces."""


#: The name a reader reaches for first; the same class.
WrongKey = DecryptError


class UnknownEpoch(CryptoError):
    """The body is sealed with a key epoch this keyring does not hold (yet)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"no key for epoch {epoch}")
        self.epoch = epoch


class NotSealedToDevice(CryptoError):
    """A key-rotation blob holds no entry for this device."""
