"""Key and channel names, and how strings are stored.

All keys of a workspace share the hash tag `{ws}`, so they live in one Redis
Cluster slot and every Lua script touches one slot only (the layout is in
relay/store/redis/__init__.py).
"""

from __future__ import annotations

EPOCH_KEY = "relay:epoch"
STATS_KEY = "relay:stats"
PAIR_INDEX = "relay:{pair}:idx"
CONTROL_CHANNEL = b"relay:ctl"
_CHAN_PREFIX = b"relay:{"
_CHAN_SUFFIX = b"}:n"


def ws_keys(ws: str) -> tuple[str, str, str]:
    """(log, dedup, meta) of a workspace."""
    tag = f"relay:{{{ws}}}:"
    return tag + "log", tag + "dedup", tag + "meta"


def keyring_key(ws: str) -> str:
    return f"relay:{{{ws}}}:keyring"


def device_keys(channel: str, ws: str) -> list[str]:
    """The entries hash and the write-time sorted set of a device channel."""
    key = f"relay:{{{ws}}}:{channel}"
    return [key, key + ":t"]


def pair_key(code: str) -> str:
    return f"relay:{{pair}}:c:{code}"


def channel(ws: str) -> bytes:
    """The pub/sub channel a workspace's appends are announced on."""
    return _CHAN_PREFIX + ws.encode() + _CHAN_SUFFIX


def channel_ws(name: bytes) -> str | None:
    if name.startswith(_CHAN_PREFIX) and name.endswith(_CHAN_SUFFIX):
        return name[len(_CHAN_PREFIX) : -len(_CHAN_SUFFIX)].decode()
    return None


# Device ids and pairing payloads are str; lone surrogates survive the round trip.
def text(value: bytes) -> str:
    return value.decode("utf-8", "surrogatepass")


def raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def probe_channel(ws: str) -> bytes:
    """A channel nobody subscribes to: a PUBLISH on it only advances replication."""
    return _CHAN_PREFIX + ws.encode() + b"}:w"


def probe_key(ws: str) -> str:
    """A short-lived key in the workspace's slot: a Cluster's WAIT probe (replicas.py)."""
    return f"relay:{{{ws}}}:w"
