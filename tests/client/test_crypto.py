"""client.crypto against the independent Hive vectors, the real Hive bodies, and itself."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from client.crypto import (
    COMPACT_MARKER,
    Device,
    Keyring,
    WorkspaceKey,
    newest_rotation,
    open_envelope,
    open_rotation,
    parse_envelope,
    rotation_epoch,
    seal,
    seal_rotation,
)
from client.errors import (
    BadEnvelope,
    CryptoError,
    DecryptError,
    NotSealed,
    NotSealedToDevice,
    UnknownEpoch,
    WrongKey,
)
from tests.conftest import FIXTURES

VECTORS = json.loads((FIXTURES / "hive_crypto_vectors.json").read_text())
HIVE_BODIES = sorted((FIXTURES / "hive_envelopes").glob("*.json"))
assert len(HIVE_BODIES) == 2


def vector_keyring() -> Keyring:
    """Epoch 0 from the passphrase, epoch 1 from the rotation sealed to device-a."""
    keyring = Keyring.single(WorkspaceKey.from_passphrase(VECTORS["passphrase"]))
    device = Device.from_hex("device-a", VECTORS["device_secret_hex"])
    assert keyring.add_rotations([VECTORS["rotation"]], device) == [1]
    return keyring


# --------------------------------------------------------------------------- the Hive vectors


def test_passphrase_derives_the_hive_key() -> None:
    key = WorkspaceKey.from_passphrase(VECTORS["passphrase"])
    assert key.hex() == VECTORS["derived_key_hex"]


def test_opens_the_epoch0_vector_with_the_passphrase_key() -> None:
    keyring = Keyring.single(WorkspaceKey.from_passphrase(VECTORS["passphrase"]))
    opened = open_envelope(json.dumps(VECTORS["sealed_epoch0"]), keyring)
    assert opened.plaintext.decode() == VECTORS["plaintext"]
    assert (opened.epoch, opened.format) == (0, "hive")


def test_device_key_matches_the_vector() -> None:
    device = Device.from_hex("device-a", VECTORS["device_secret_hex"])
    assert device.public_hex == VECTORS["device_public_hex"]


def test_opens_the_rotation_sealed_to_device_a() -> None:
    device = Device.from_hex("device-a", VECTORS["device_secret_hex"])
    epoch, key = open_rotation(VECTORS["rotation"], device)
    assert epoch == 1
    assert key.hex() == VECTORS["epoch1_key_hex"]
    assert rotation_epoch(VECTORS["rotation"]) == 1


def test_opens_the_epoch1_vector_with_the_rotated_key() -> None:
    opened = open_envelope(msgspec.json.encode(VECTORS["sealed_epoch1"]), vector_keyring())
    assert opened.plaintext.decode() == VECTORS["plaintext"]
    assert opened.epoch == 1


def test_the_epoch1_vector_needs_the_rotation() -> None:
    keyring = Keyring.single(WorkspaceKey.from_passphrase(VECTORS["passphrase"]))
    with pytest.raises(UnknownEpoch) as info:
        open_envelope(VECTORS["sealed_epoch1"], keyring)
    assert info.value.epoch == 1


def test_a_body_without_version_is_epoch0() -> None:
    body = {k: v for k, v in VECTORS["sealed_epoch0"].items() if k != "version"}
    keyring = Keyring.single(WorkspaceKey.from_hex(VECTORS["derived_key_hex"]))
    assert open_envelope(body, keyring).plaintext.decode() == VECTORS["plaintext"]


def test_other_devices_cannot_open_the_vector_rotation() -> None:
    with pytest.raises(NotSealedToDevice):
        open_rotation(VECTORS["rotation"], Device.generate("device-b"))
    impostor = Device.generate("device-a")  # right id, wrong secret
    with pytest.raises(DecryptError):
        open_rotation(VECTORS["rotation"], impostor)


# --------------------------------------------------------------------------- what we write


def test_sealed_bodies_follow_the_hive_rules() -> None:
    key = WorkspaceKey.from_hex(VECTORS["derived_key_hex"])
    body = seal(VECTORS["plaintext"].encode(), key, 7)
    obj = json.loads(body)
    # Sorted keys, compact separators, integer arrays, version = epoch.
    assert body == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert list(obj) == ["ciphertext", "nonce", "version"]
    assert obj["version"] == 7 and len(obj["nonce"]) == 12
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in obj["ciphertext"])
    assert len(obj["ciphertext"]) == len(VECTORS["plaintext"].encode()) + 16


def test_sealed_bodies_decode_through_the_hive_rules_independently() -> None:
    """Decrypt what we wrote with nothing but the spec: no SDK opening code involved."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = WorkspaceKey.from_hex(VECTORS["derived_key_hex"])
    obj = json.loads(seal(b'{"a":1}', key, 0))
    aead = ChaCha20Poly1305(bytes.fromhex(VECTORS["derived_key_hex"]))
    assert aead.decrypt(bytes(obj["nonce"]), bytes(obj["ciphertext"]), None) == b'{"a":1}'


def test_rotations_we_write_open_through_the_hive_rules_independently() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    device = Device.from_hex("device-a", VECTORS["device_secret_hex"])
    new_key = WorkspaceKey.generate()
    blob = json.loads(seal_rotation(new_key, 3, {"device-a": VECTORS["device_public_hex"]}))
    assert blob["version"] == 3
    entry = blob["sealed"]["device-a"]
    assert sorted(entry) == ["ciphertext", "ephemeralPublic"]
    eph = bytes(entry["ephemeralPublic"])
    secret = X25519PrivateKey.from_private_bytes(bytes.fromhex(VECTORS["device_secret_hex"]))
    shared = secret.exchange(X25519PublicKey.from_public_bytes(eph))
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=44,
        salt=eph + device.public_bytes,
        info=b"hive-workspace-key-seal-v1",
    ).derive(shared)
    plain = ChaCha20Poly1305(okm[:32]).decrypt(okm[32:], bytes(entry["ciphertext"]), None)
    assert plain == new_key.material


@pytest.mark.parametrize("fmt", ["hive", "compact"])
def test_round_trip(fmt: str) -> None:
    keyring = Keyring.single(WorkspaceKey.generate(), epoch=4)
    body = keyring.seal(b'{"x":"\\u2713"}', format=fmt, workspace="ws-1")
    opened = keyring.open(body, workspace="ws-1")
    assert (opened.plaintext, opened.epoch, opened.format) == (b'{"x":"\\u2713"}', 4, fmt)


def test_every_seal_uses_a_fresh_nonce() -> None:
    key = WorkspaceKey.generate()
    nonces = {parse_envelope(seal(b"{}", key, 0)).nonce for _ in range(50)}
    assert len(nonces) == 50


def test_keyring_seals_with_the_newest_epoch_and_opens_older_ones() -> None:
    old, new = WorkspaceKey.generate(), WorkspaceKey.generate()
    keyring = Keyring({0: old, 2: new})
    assert keyring.current_epoch == 2
    assert parse_envelope(keyring.seal(b"{}")).epoch == 2
    assert keyring.open(seal(b"[1]", old, 0)).plaintext == b"[1]"
    assert keyring.epochs == (0, 2)


def test_rotation_round_trip_and_newest_wins() -> None:
    me = Device.generate("me")
    other = Device.generate("other")
    k1, k2 = WorkspaceKey.generate(), WorkspaceKey.generate()
    blob1 = seal_rotation(k1, 1, {"me": me.public_key, "other": other.public_bytes})
    blob2 = seal_rotation(k2, 2, {"other": other.public_hex})  # "me" removed
    assert newest_rotation([blob1, blob2], other) == (2, k2)
    assert newest_rotation([blob1, blob2], me) == (1, k1)
    assert newest_rotation([blob2], me) is None


def test_add_rotations_keeps_trusted_epochs_and_skips_garbage() -> None:
    me = Device.generate("me")
    trusted = WorkspaceKey.generate()
    keyring = Keyring({1: trusted})
    blobs = [
        b"not json",
        b'{"version":5}',
        seal_rotation(WorkspaceKey.generate(), 1, {"me": me.public_key}),  # replay of epoch 1
        seal_rotation(WorkspaceKey.generate(), 2, {"someone": Device.generate("x").public_key}),
        seal_rotation(WorkspaceKey.generate(), 3, {"me": me.public_key}),
    ]
    assert keyring.add_rotations(blobs, me) == [3]
    assert keyring.get(1) is trusted


# --------------------------------------------------------------------------- the real Hive bodies


@pytest.mark.parametrize("path", HIVE_BODIES, ids=lambda p: p.name)
def test_real_hive_bodies_parse_as_sealed(path: Path) -> None:
    raw = path.read_bytes()
    env = parse_envelope(raw)
    assert env.format == "hive" and env.epoch == 0 and len(env.nonce) == 12
    assert len(env.ciphertext) > 16


@pytest.mark.parametrize("path", HIVE_BODIES, ids=lambda p: p.name)
def test_real_hive_bodies_fail_cleanly_with_a_wrong_key(path: Path) -> None:
    raw = path.read_bytes()
    for keyring in (
        Keyring.single(WorkspaceKey.generate()),
        Keyring.single(WorkspaceKey.from_passphrase(VECTORS["passphrase"])),
    ):
        with pytest.raises(WrongKey) as info:
            open_envelope(raw, keyring)
        assert isinstance(info.value, CryptoError)
        assert "epoch-0" in str(info.value)


# --------------------------------------------------------------------------- failures


def test_tampering_fails() -> None:
    keyring = Keyring.single(WorkspaceKey.generate())
    obj = json.loads(keyring.seal(b'{"amount":10}'))
    for field in ("ciphertext", "nonce"):
        bad = dict(obj)
        bad[field] = list(obj[field])
        bad[field][0] ^= 1
        with pytest.raises(DecryptError):
            open_envelope(bad, keyring)
    truncated = dict(obj, ciphertext=obj["ciphertext"][:-1])
    with pytest.raises(DecryptError):
        open_envelope(truncated, keyring)


def test_relabelled_epoch_fails() -> None:
    key = WorkspaceKey.generate()
    keyring = Keyring({0: key, 1: key})
    obj = json.loads(seal(b"{}", key, 0, format="compact", workspace="w"))
    obj["version"] = 1  # the compact format binds the epoch: same key, other label → fails
    with pytest.raises(DecryptError):
        open_envelope(obj, keyring, workspace="w")


def test_compact_format_binds_the_workspace() -> None:
    keyring = Keyring.single(WorkspaceKey.generate())
    body = keyring.seal(b'{"secret":1}', format="compact", workspace="team-a")
    obj = json.loads(body)
    assert obj["format"] == COMPACT_MARKER
    assert isinstance(obj["ciphertext"], str) and isinstance(obj["nonce"], str)
    assert keyring.open(body, workspace="team-a").plaintext == b'{"secret":1}'
    with pytest.raises(DecryptError, match="another workspace"):
        keyring.open(body, workspace="team-b")
    with pytest.raises(CryptoError):
        keyring.open(body)  # no workspace given


def test_compact_needs_a_workspace_to_seal() -> None:
    with pytest.raises(ValueError, match="workspace"):
        seal(b"{}", WorkspaceKey.generate(), 0, format="compact")


@pytest.mark.parametrize(
    "body",
    [b'{"kind":"plain"}', b"[1,2]", b'"text"', b"42", {"nonce": [0] * 12}],
)
def test_unsealed_json_is_not_sealed(body: object) -> None:
    with pytest.raises(NotSealed):
        parse_envelope(body)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"ciphertext":"abc","nonce":[1]}',
        b'{"ciphertext":[1,2,300],"nonce":[0,0,0,0,0,0,0,0,0,0,0,0]}',
        b'{"ciphertext":' + json.dumps([1] * 20).encode() + b',"nonce":[0,0,0]}',
        b'{"ciphertext":[1,2],"nonce":[0,0,0,0,0,0,0,0,0,0,0,0]}',
        b'{"ciphertext":"AAAA","format":"other-v9","nonce":"AAAA","version":0}',
        b'{"ciphertext":"!!","format":"hive-relay-compact-v1","nonce":"AAAA","version":0}',
        b'{"ciphertext":[],"nonce":[],"version":-1}',
    ],
)
def test_malformed_sealed_bodies_are_bad_envelopes(body: bytes) -> None:
    with pytest.raises(BadEnvelope):
        parse_envelope(body)


# --------------------------------------------------------------------------- keys


def test_key_parsing() -> None:
    hexkey = VECTORS["derived_key_hex"]
    assert WorkspaceKey.parse(hexkey).hex() == hexkey
    assert WorkspaceKey.parse(hexkey.upper()).hex() == hexkey
    assert WorkspaceKey.parse(VECTORS["passphrase"]).hex() == hexkey
    with pytest.raises(ValueError):
        WorkspaceKey.from_hex("abcd")
    with pytest.raises(ValueError):
        WorkspaceKey.from_hex("zz" * 32)
    with pytest.raises(ValueError):
        WorkspaceKey.from_passphrase("")
    with pytest.raises(ValueError):
        WorkspaceKey(b"short")


def test_keys_never_show_in_repr() -> None:
    key = WorkspaceKey.from_hex(VECTORS["derived_key_hex"])
    device = Device.from_hex("d", VECTORS["device_secret_hex"])
    for text in (repr(key), repr(Keyring.single(key)), repr(device)):
        assert VECTORS["derived_key_hex"] not in text
        assert VECTORS["device_secret_hex"] not in text


def test_generated_keys_differ() -> None:
    assert WorkspaceKey.generate() != WorkspaceKey.generate()
    device = Device.generate("d")
    assert Device.from_hex("d", device.secret_hex()).public_hex == device.public_hex


def test_epochs_are_u32() -> None:
    with pytest.raises(ValueError):
        seal(b"{}", WorkspaceKey.generate(), -1)
    with pytest.raises(ValueError):
        Keyring({1 << 32: WorkspaceKey.generate()})
    with pytest.raises(CryptoError):
        _ = Keyring().current_epoch
