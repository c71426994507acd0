"""What iterating a `Workspace` yields: opened events, and the signals a program must not miss.

Only `Event` carries application data. The others exist because silence would
be wrong: an envelope that can never be opened (`Unopenable`), a stop at an
envelope whose key has not arrived (`KeyMissing`), envelopes the relay dropped
before this reader saw them (`Gap`), and a relay that forgot its history
(`RelayReset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from client.errors import CryptoError

__all__ = ["Event", "Gap", "KeyMissing", "RelayReset", "Unopenable", "WorkspaceEvent"]


@dataclass(frozen=True)
class Event:
    """An opened envelope: its relay `seq`, the decoded JSON `data`, and its key epoch.

    `key_epoch` is None for a plaintext envelope (only when the workspace allows them).
    """

    seq: int
    data: Any
    key_epoch: int | None
    plaintext: bytes = field(repr=False)


@dataclass(frozen=True)
class Unopenable:
    """An envelope that will never open with the keys held (wrong key, tampered, not JSON…).

    The cursor moves past it once handed over: waiting would not help.
    """

    seq: int
    error: CryptoError
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyMissing:
    """The cursor stopped at `seq`: it is sealed with key epoch `epoch`, which this keyring lacks.

    Nothing after it is delivered until the key arrives (through the keyring
    and this device's identity, or `workspace.keyring.add`); the workspace
    keeps retrying. Yielded once per stop.
    """

    seq: int
    epoch: int


@dataclass(frozen=True)
class Gap:
    """The relay dropped envelopes past the cursor (`after`) before this reader saw them.

    Delivery continues from `oldest`, the oldest envelope it still retains
    (None when the relay did not say). Re-sync the missing part from a peer.
    """

    after: int
    oldest: int | None


@dataclass(frozen=True)
class RelayReset:
    """The relay's history epoch changed: it may have lost envelopes it had acknowledged.

    Seqs still never rewind, so delivery continues; re-sync from a peer.
    """

    previous: str
    current: str


WorkspaceEvent = Event | Unopenable | KeyMissing | Gap | RelayReset
