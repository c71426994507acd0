"""Workspace keys, sealed envelopes and key rotation, interoperable with Hive devices.

The relay is content-blind: everything it stores is sealed here. Two body formats:

* **Hive** (the default, what Hive desktop devices read and write):
  `{"ciphertext":[ints],"nonce":[12 ints],"version":<key epoch>}`, sorted and
  compact; ChaCha20-Poly1305 with a random nonce and no associated data. A body
  without `version` is epoch 0.
* **Compact** (opt-in, Python-to-Python): `{"ciphertext":"<b64>","format":
  "hive-relay-compact-v1","nonce":"<b64>","version":<epoch>}`, with associated
  data binding the workspace id and key epoch, so a body copied into another
  workspace (or relabelled with another epoch) fails to open.

Readers accept both. Key rotation seals a new 32-byte key to each device's
X25519 public key exactly as CLIENT.md describes. All primitives come from
`cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from client.errors import (
    BadEnvelope,
    CryptoError,
    DecryptError,
    NotSealed,
    NotSealedToDevice,
    UnknownEpoch,
)
from client.wire import CompactSealed, HiveSealed, KeyRotation, SealedKey

__all__ = [
    "COMPACT_MARKER",
    "Device",
    "Keyring",
    "Opened",
    "SealFormat",
    "SealedEnvelope",
    "WorkspaceKey",
    "coerce_public_key",
    "newest_rotation",
    "open_envelope",
    "open_rotation",
    "parse_envelope",
    "seal",
    "seal_rotation",
]

log = logging.getLogger(__name__)

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_EPOCH = 0xFFFFFFFF

# The Hive passphrase KDF parameters (CLIENT.md). Changing any of them breaks interop.
ARGON2_SALT = b"hive-workspace-key-argon2id"
ARGON2_MEMORY_KIB = 19456
ARGON2_PASSES = 2
ARGON2_LANES = 1

ROTATION_INFO = b"hive-workspace-key-seal-v1"

#: The `format` marker of the compact envelope; also the prefix of its associated data.
COMPACT_MARKER = "hive-relay-compact-v1"

SealFormat = Literal["hive", "compact"]

Body = bytes | bytearray | memoryview | str | Mapping[str, Any]


def _check_epoch(epoch: int) -> int:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= MAX_EPOCH:
        raise ValueError(f"key epoch must be an integer in 0..{MAX_EPOCH}, got {epoch!r}")
    return epoch


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, repr=False)
class WorkspaceKey:
    """A 32-byte ChaCha20-Poly1305 workspace key. Its repr never shows the key."""

    material: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.material, bytes) or len(self.material) != KEY_SIZE:
            raise ValueError(f"a workspace key is exactly {KEY_SIZE} bytes")

    @classmethod
    def generate(cls) -> WorkspaceKey:
        """A fresh random key from the operating system's CSPRNG."""
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def from_hex(cls, text: str) -> WorkspaceKey:
        """Parse 64 hex characters (surrounding whitespace ignored)."""
        cleaned = text.strip()
        if len(cleaned) != 2 * KEY_SIZE:
            raise ValueError(f"a hex workspace key is {2 * KEY_SIZE} hex characters")
        try:
            return cls(bytes.fromhex(cleaned))
        except ValueError:
            raise ValueError("a hex workspace key has only the characters 0-9 a-f") from None

    @classmethod
    def from_passphrase(cls, passphrase: str) -> WorkspaceKey:
        """Derive the key a Hive device derives from the same passphrase (Argon2id, Hive params)."""
        if not passphrase:
            raise ValueError("the passphrase is empty")
        kdf = Argon2id(
            salt=ARGON2_SALT,
            length=KEY_SIZE,
            iterations=ARGON2_PASSES,
            lanes=ARGON2_LANES,
            memory_cost=ARGON2_MEMORY_KIB,
        )
        return cls(kdf.derive(passphrase.encode("utf-8")))

    @classmethod
    def parse(cls, text: str) -> WorkspaceKey:
        """A 64-hex key as-is; any other text is a passphrase (as `HIVE_WORKSPACE_KEY` is read)."""
        if not isinstance(text, str):
            raise TypeError(
                f"parse() takes text (64 hex characters or a passphrase), got {type(text).__name__}"
                "; for 32 raw key bytes use WorkspaceKey(material)"
            )
        cleaned = text.strip()
        if len(cleaned) == 2 * KEY_SIZE and all(c in string.hexdigits for c in cleaned):
            return cls.from_hex(cleaned)
        return cls.from_passphrase(text)

    def hex(self) -> str:
        """The key as 64 lowercase hex characters (secret: handle like a password)."""
        return self.material.hex()

    @property
    def fingerprint(self) -> str:
        """A short, non-secret identifier of the key, for logs and comparisons by eye."""
        return hashlib.sha256(b"hive-key-fingerprint:" + self.material).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"WorkspaceKey(fingerprint={self.fingerprint!r})"


class Keyring:
    """The workspace keys this program holds, by key epoch.

    New bodies are sealed with the newest epoch; older epochs stay to open older
    bodies, as a Hive device keeps them after a rotation.
    """

    def __init__(self, keys: Mapping[int, WorkspaceKey] | None = None) -> None:
        self._keys: dict[int, WorkspaceKey] = {}
        for epoch, key in (keys or {}).items():
            self.add(epoch, key)

    @classmethod
    def single(cls, key: WorkspaceKey, epoch: int = 0) -> Keyring:
        """A keyring holding one key at `epoch`."""
        return cls({epoch: key})

    def add(self, epoch: int, key: WorkspaceKey) -> None:
        """Hold `key` for `epoch` (replacing any key held for it)."""
        _check_epoch(epoch)
        if not isinstance(key, WorkspaceKey):
            raise TypeError("add() takes a WorkspaceKey")
        self._keys[epoch] = key

    def get(self, epoch: int) -> WorkspaceKey:
        """The key for `epoch`, or `UnknownEpoch`."""
        try:
            return self._keys[epoch]
        except KeyError:
            raise UnknownEpoch(epoch) from None

    def __contains__(self, epoch: object) -> bool:
        return epoch in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._keys))

    @property
    def epochs(self) -> tuple[int, ...]:
        """Every epoch held, oldest first."""
        return tuple(sorted(self._keys))

    @property
    def current_epoch(self) -> int:
        """The newest epoch held: the one new bodies are sealed with."""
        if not self._keys:
            raise CryptoError("the keyring is empty")
        return max(self._keys)

    @property
    def current_key(self) -> WorkspaceKey:
        """The key of the newest epoch held: the one new bodies are sealed with."""
        return self._keys[self.current_epoch]

    def seal(
        self, plaintext: bytes, *, format: SealFormat = "hive", workspace: str | None = None
    ) -> bytes:
        """Seal with the newest key; see `seal()`."""
        return seal(
            plaintext, self.current_key, self.current_epoch, format=format, workspace=workspace
        )

    def open(self, body: Body, *, workspace: str | None = None) -> Opened:
        """Open a sealed body with the key of its epoch; see `open_envelope()`."""
        return open_envelope(body, self, workspace=workspace)

    def add_rotations(self, blobs: Iterable[Body], device: Device) -> list[int]:
        """Adopt every rotation in `blobs` sealed to `device`; return the epochs newly added.

        Epochs already held are kept (a later blob cannot replace a key this
        program trusts). Blobs that are malformed, not for this device, or fail
        to open are skipped: another member's garbage must not stop this one.
        """
        added: list[int] = []
        for blob in blobs:
            try:
                epoch, key = open_rotation(blob, device)
            except NotSealedToDevice:
                continue
            except CryptoError as exc:
                log.warning("skipping a key rotation this device cannot open: %s", exc)
                continue
            if epoch not in self._keys:
                self._keys[epoch] = key
                added.append(epoch)
        return sorted(added)

    def __repr__(self) -> str:
        return f"Keyring(epochs={list(self.epochs)})"


# --------------------------------------------------------------------------- envelopes


@dataclass(frozen=True)
class SealedEnvelope:
    """A parsed sealed body: which format, which key epoch, and the raw crypto fields."""

    format: SealFormat
    epoch: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Opened:
    """The result of opening a body: the plaintext and the epoch and format it came in."""

    plaintext: bytes
    epoch: int
    format: SealFormat


def _compact_aad(workspace: str, epoch: int) -> bytes:
    ws = workspace.encode("utf-8")
    return (
        COMPACT_MARKER.encode("ascii")
        + b"\x00"
        + len(ws).to_bytes(4, "big")
        + ws
        + epoch.to_bytes(4, "big")
    )


def seal(
    plaintext: bytes,
    key: WorkspaceKey,
    epoch: int,
    *,
    format: SealFormat = "hive",
    workspace: str | None = None,
) -> bytes:
    """Seal `plaintext` under `key` as key epoch `epoch`; return the body to post.

    `format="hive"` (default) writes what Hive devices read. `format="compact"`
    needs `workspace`: the body then opens only in that workspace.
    """
    _check_epoch(epoch)
    nonce = os.urandom(NONCE_SIZE)
    aead = ChaCha20Poly1305(key.material)
    if format == "hive":
        ciphertext = aead.encrypt(nonce, bytes(plaintext), None)
        return msgspec.json.encode(
            HiveSealed(ciphertext=list(ciphertext), nonce=list(nonce), version=epoch)
        )
    if format == "compact":
        if not workspace:
            raise ValueError("the compact format binds a workspace id: pass workspace=")
        ciphertext = aead.encrypt(nonce, bytes(plaintext), _compact_aad(workspace, epoch))
        return msgspec.json.encode(
            CompactSealed(
                ciphertext=base64.b64encode(ciphertext).decode("ascii"),
                format=COMPACT_MARKER,
                nonce=base64.b64encode(nonce).decode("ascii"),
                version=epoch,
            )
        )
    raise ValueError(f"unknown seal format {format!r} (use 'hive' or 'compact')")


def _decode_json(body: Body) -> Any:
    if isinstance(body, Mapping):
        return body
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadEnvelope(f"the body is not JSON: {exc}") from None


def _b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadEnvelope(f"compact envelope: {field} is not base64") from None


def parse_envelope(body: Body) -> SealedEnvelope:
    """Recognise a sealed body without opening it.

    Raises `NotSealed` for JSON that is not a sealed envelope (a plaintext
    envelope), `BadEnvelope` for a body that is not JSON or whose sealed fields
    are malformed.
    """
    obj = _decode_json(body)
    if not isinstance(obj, Mapping) or "ciphertext" not in obj:
        raise NotSealed("the body has no ciphertext: it is not a sealed envelope")
    try:
        if "format" in obj:
            compact = msgspec.convert(obj, CompactSealed)
            if compact.format != COMPACT_MARKER:
                raise BadEnvelope(f"unknown envelope format {compact.format!r}")
            nonce = _b64(compact.nonce, "nonce")
            ciphertext = _b64(compact.ciphertext, "ciphertext")
            fmt: SealFormat = "compact"
            epoch = compact.version
        else:
            hive = msgspec.convert(obj, HiveSealed)
            nonce, ciphertext = bytes(hive.nonce), bytes(hive.ciphertext)
            fmt, epoch = "hive", hive.version
    except msgspec.ValidationError as exc:
        raise BadEnvelope(f"malformed sealed envelope: {exc}") from None
    if len(nonce) != NONCE_SIZE:
        raise BadEnvelope(f"the nonce is {len(nonce)} bytes, not {NONCE_SIZE}")
    if len(ciphertext) < TAG_SIZE:
        raise BadEnvelope("the ciphertext is shorter than its authentication tag")
    return SealedEnvelope(format=fmt, epoch=epoch, nonce=nonce, ciphertext=ciphertext)


def open_envelope(
    body: Body | SealedEnvelope, keyring: Keyring, *, workspace: str | None = None
) -> Opened:
    """Open a sealed body (either format) with the key of its epoch.

    Raises `NotSealed`, `BadEnvelope`, `UnknownEpoch` (the epoch's key is not in
    `keyring`: fetch the keyring and retry, do not skip) or `DecryptError`.
    Opening a compact body needs the `workspace` it was sealed for.
    """
    env = body if isinstance(body, SealedEnvelope) else parse_envelope(body)
    key = keyring.get(env.epoch)
    aad: bytes | None = None
    if env.format == "compact":
        if not workspace:
            raise CryptoError("a compact envelope opens only with its workspace id (workspace=)")
        aad = _compact_aad(workspace, env.epoch)
    try:
        plaintext = ChaCha20Poly1305(key.material).decrypt(env.nonce, env.ciphertext, aad)
    except InvalidTag:
        where = " or it was sealed for another workspace" if env.format == "compact" else ""
        raise DecryptError(
            f"cannot open an epoch-{env.epoch} envelope: wrong key or tampered body{where}"
        ) from None
    return Opened(plaintext=plaintext, epoch=env.epoch, format=env.format)


# --------------------------------------------------------------------------- rotation


def coerce_public_key(value: X25519PublicKey | bytes | str) -> X25519PublicKey:
    """An X25519 public key from itself, 32 raw bytes, or 64 hex characters."""
    if isinstance(value, X25519PublicKey):
        return value
    raw = bytes.fromhex(value.strip()) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError("an X25519 public key is 32 bytes (64 hex characters)")
    return X25519PublicKey.from_public_bytes(raw)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, repr=False)
class Device:
    """This device's identity for key rotation: its id in the workspace and X25519 secret."""

    device_id: str
    secret: X25519PrivateKey

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("a device id is required")

    @classmethod
    def generate(cls, device_id: str) -> Device:
        """A new device identity with a fresh random X25519 secret."""
        return cls(device_id, X25519PrivateKey.generate())

    @classmethod
    def from_hex(cls, device_id: str, secret_hex: str) -> Device:
        """The device whose X25519 secret is 64 hex characters."""
        expected = (
            'a device key is an X25519 secret as 64 hex characters (the "secret" that '
            "`python -m client keygen --device` prints)"
        )
        if not isinstance(secret_hex, str):
            raise ValueError(f"{expected}, got {type(secret_hex).__name__}")
        cleaned = secret_hex.strip()
        try:
            raw = bytes.fromhex(cleaned)
        except ValueError:
            raise ValueError(f"{expected}; this one has other characters") from None
        if len(raw) != 32:
            raise ValueError(f"{expected}; this one has {len(cleaned)}")
        return cls(device_id, X25519PrivateKey.from_private_bytes(raw))

    @property
    def public_key(self) -> X25519PublicKey:
        """This device's X25519 public key (what others seal rotations to)."""
        return self.secret.public_key()

    @property
    def public_bytes(self) -> bytes:
        """The public key as its 32 raw bytes."""
        return _raw_public(self.public_key)

    @property
    def public_hex(self) -> str:
        """The public key as 64 hex characters (what `rotate name=public-hex` takes)."""
        return self.public_bytes.hex()

    def secret_hex(self) -> str:
        """The X25519 secret as hex (secret: store it like a password)."""
        return self.secret.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ).hex()

    def __repr__(self) -> str:
        return f"Device({self.device_id!r}, public={self.public_hex[:16]}…)"


def _seal_key(
    eph: X25519PrivateKey, recipient: X25519PublicKey
) -> tuple[ChaCha20Poly1305, bytes, bytes]:
    eph_public = _raw_public(eph.public_key())
    try:
        shared = eph.exchange(recipient)
    except ValueError:
        raise ValueError("the recipient public key is not a usable X25519 key") from None
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE + NONCE_SIZE,
        salt=eph_public + _raw_public(recipient),
        info=ROTATION_INFO,
    ).derive(shared)
    return ChaCha20Poly1305(okm[:KEY_SIZE]), okm[KEY_SIZE:], eph_public


def seal_rotation(
    key: WorkspaceKey,
    epoch: int,
    recipients: Mapping[str, X25519PublicKey | bytes | str],
) -> bytes:
    """The `/keyring` blob sealing `key` (as `epoch`) to each device's X25519 public key.

    Removing a member is rotating to the devices that remain: the removed
    device gets no entry and cannot open bodies sealed with the new epoch.
    """
    _check_epoch(epoch)
    if not recipients:
        raise ValueError("a key rotation needs at least one recipient device")
    sealed: dict[str, SealedKey] = {}
    for device_id in sorted(recipients):
        recipient = coerce_public_key(recipients[device_id])
        # Per CLIENT.md the AEAD key and nonce both come from HKDF over a fresh
        # ephemeral secret, so every entry uses a never-repeated (key, nonce) pair.
        eph = X25519PrivateKey.generate()
        aead, nonce, eph_public = _seal_key(eph, recipient)
        sealed[device_id] = SealedKey(
            ciphertext=list(aead.encrypt(nonce, key.material, None)),
            ephemeral_public=list(eph_public),
        )
    return msgspec.json.encode(KeyRotation(sealed=sealed, version=epoch), order="sorted")


def rotation_epoch(blob: Body) -> int:
    """The key epoch a rotation blob announces (without opening it)."""
    return _parse_rotation(blob).version


def _parse_rotation(blob: Body) -> KeyRotation:
    obj = _decode_json(blob)
    try:
        return msgspec.convert(obj, KeyRotation)
    except msgspec.ValidationError as exc:
        raise BadEnvelope(f"malformed key rotation: {exc}") from None


def open_rotation(blob: Body, device: Device) -> tuple[int, WorkspaceKey]:
    """Open the entry of `blob` sealed to `device`: `(epoch, key)`.

    Raises `NotSealedToDevice` when the blob has no entry for this device (it
    was removed, or not yet added), `BadEnvelope` or `DecryptError` otherwise.
    """
    rotation = _parse_rotation(blob)
    entry = rotation.sealed.get(device.device_id)
    if entry is None:
        raise NotSealedToDevice(
            f"the epoch-{rotation.version} rotation is not sealed to {device.device_id!r}"
        )
    if len(entry.ephemeral_public) != 32:
        raise BadEnvelope("ephemeralPublic is not 32 bytes")
    eph_public = X25519PublicKey.from_public_bytes(bytes(entry.ephemeral_public))
    try:
        shared = device.secret.exchange(eph_public)
    except ValueError:
        raise DecryptError("the rotation's ephemeral key is not usable") from None
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE + NONCE_SIZE,
        salt=bytes(entry.ephemeral_public) + device.public_bytes,
        info=ROTATION_INFO,
    ).derive(shared)
    try:
        material = ChaCha20Poly1305(okm[:KEY_SIZE]).decrypt(
            okm[KEY_SIZE:], bytes(entry.ciphertext), None
        )
    except InvalidTag:
        raise DecryptError(
            f"the epoch-{rotation.version} rotation entry for {device.device_id!r} "
            "does not open with this device's secret"
        ) from None
    if len(material) != KEY_SIZE:
        raise BadEnvelope("the rotated key is not 32 bytes")
    return rotation.version, WorkspaceKey(material)


def newest_rotation(blobs: Iterable[Body], device: Device) -> tuple[int, WorkspaceKey] | None:
    """The highest-epoch rotation in `blobs` that opens for `device`, or None."""
    best: tuple[int, WorkspaceKey] | None = None
    for blob in blobs:
        try:
            epoch, key = open_rotation(blob, device)
        except CryptoError:
            continue
        if best is None or epoch > best[0]:
            best = (epoch, key)
    return best
