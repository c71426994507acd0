"""The JSON shapes the SDK reads and writes, declared once as msgspec Structs.

Relay answers (`PushResult`, `RawRow`, …) follow PROTOCOL.md; sealed bodies
(`HiveSealed`, `CompactSealed`, `KeyRotation`) follow CLIENT.md. Fields are
declared in sorted order so encoding yields the sorted, compact JSON Hive
devices write. Unknown fields are ignored on decode, so a newer relay or
device adding fields breaks nothing.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Seq = Annotated[int, msgspec.Meta(ge=0)]


# --------------------------------------------------------------------------- relay answers


class ErrorBody(msgspec.Struct):
    """`{"error": "<code>", "message": "<sentence>"}` on every error status."""

    error: str = ""
    message: str = ""


class PushResult(msgspec.Struct, frozen=True):
    """Answer to a push: the relay-assigned seq; `duplicate` when the idempotency key was known."""

    seq: Seq
    duplicate: bool = False


class BatchResult(msgspec.Struct, frozen=True):
    """Answer to a batch push: one seq per element, in element order."""

    seqs: list[Seq]


class RawRow(msgspec.Struct, frozen=True):
    """One envelope row as the relay sends it; `body` keeps the stored bytes untouched."""

    seq: Seq
    body: msgspec.Raw


class Ok(msgspec.Struct):
    """`{"ok": true}` from the side channels."""

    ok: bool


class DeviceEntry(msgspec.Struct):
    """The body posted to presence and candidates."""

    data: msgspec.Raw
    device_id: str


class PairingCreated(msgspec.Struct, frozen=True):
    """A fresh pairing code and the seconds until it expires."""

    code: str
    expires_in: int


class PairingRequest(msgspec.Struct, omit_defaults=True):
    payload: str
    ttl_secs: int | None = None


class PairingPayload(msgspec.Struct):
    payload: str


class Nudge(msgspec.Struct):
    """A nudge-stream event: the workspace's head moved to `seq`."""

    seq: Seq


class GapNotice(msgspec.Struct):
    """SSE `event: gap`: envelopes below `oldest` were dropped before this reader saw them."""

    oldest: Seq


# --------------------------------------------------------------------------- sealed bodies


class HiveSealed(msgspec.Struct):
    """The Hive sealed envelope: integer arrays, key epoch in `version` (0 when absent)."""

    ciphertext: list[Byte]
    nonce: list[Byte]
    version: U32 = 0


class CompactSealed(msgspec.Struct):
    """The opt-in compact envelope: base64 fields and a `format` marker (see crypto.py)."""

    ciphertext: str
    format: str
    nonce: str
    version: U32


class SealedKey(msgspec.Struct):
    """One device's entry in a key rotation: the new key sealed to its X25519 public key."""

    ciphertext: list[Byte]
    ephemeral_public: list[Byte] = msgspec.field(name="ephemeralPublic")


class KeyRotation(msgspec.Struct):
    """The body posted to `/keyring`: a new key epoch sealed to each remaining device."""

    sealed: dict[str, SealedKey]
    version: U32
