"""The hive-relay client SDK: seal, send and follow end-to-end-encrypted envelopes.

High level: `Workspace` (async) and `SyncWorkspace` join one workspace, seal
what they send and yield opened `Event`s (plus `Gap`, `RelayReset`,
`KeyMissing` and `Unopenable` signals). Low level: `RelayClient` and
`AsyncRelayClient` speak the relay's HTTP API; `client.crypto` holds keys,
the sealed formats and key rotation. Every error derives from `HiveError`.
See docs/client.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The installed version of this SDK (the hive-relay distribution).
    __version__ = version("hive-relay")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0.0.0"

from client.crypto import (
    COMPACT_MARKER,
    Device,
    Keyring,
    Opened,
    SealedEnvelope,
    SealFormat,
    WorkspaceKey,
    newest_rotation,
    open_envelope,
    open_rotation,
    parse_envelope,
    seal,
    seal_rotation,
)
from client.cursor import CursorState, CursorStore, FileCursorStore, MemoryCursorStore
from client.errors import (
    BadEnvelope,
    BadRequest,
    BadResponse,
    ConfigError,
    CryptoError,
    DecryptError,
    Forbidden,
    HiveError,
    NotFound,
    NotSealed,
    NotSealedToDevice,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    RelayFull,
    Unauthorized,
    Unavailable,
    UnknownEpoch,
    Unreachable,
    Unsupported,
    WrongKey,
)
from client.events import Event, Gap, KeyMissing, RelayReset, Unopenable, WorkspaceEvent
from client.http import DEFAULT_MAX_BODY_BYTES, AsyncRelayClient, Page, RelayClient, Row
from client.retry import Backoff
from client.sync import SyncWorkspace
from client.wire import GapNotice, Nudge, PairingCreated, PushResult
from client.workspace import ENV_VARS, TransportMode, Workspace

__all__ = [
    "COMPACT_MARKER",
    "DEFAULT_MAX_BODY_BYTES",
    "ENV_VARS",
    "AsyncRelayClient",
    "Backoff",
    "BadEnvelope",
    "BadRequest",
    "BadResponse",
    "ConfigError",
    "CryptoError",
    "CursorState",
    "CursorStore",
    "DecryptError",
    "Device",
    "Event",
    "FileCursorStore",
    "Forbidden",
    "Gap",
    "GapNotice",
    "HiveError",
    "KeyMissing",
    "Keyring",
    "MemoryCursorStore",
    "NotFound",
    "NotSealed",
    "NotSealedToDevice",
    "Nudge",
    "Opened",
    "Page",
    "PairingCreated",
    "PayloadTooLarge",
    "PushResult",
    "RateLimited",
    "RelayClient",
    "RelayError",
    "RelayFull",
    "RelayReset",
    "Row",
    "SealFormat",
    "SealedEnvelope",
    "SyncWorkspace",
    "TransportMode",
    "Unauthorized",
    "Unavailable",
    "UnknownEpoch",
    "Unopenable",
    "Unreachable",
    "Unsupported",
    "Workspace",
    "WorkspaceEvent",
    "WorkspaceKey",
    "WrongKey",
    "__version__",
    "newest_rotation",
    "open_envelope",
    "open_rotation",
    "parse_envelope",
    "seal",
    "seal_rotation",
]
