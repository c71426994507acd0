"""Every knob of the relay: its environment variable, flag, default and validation.

`Settings.load(argv, environ)` is the only way settings are made in production.
A value that is present but unusable raises `SettingsError` naming the setting;
`python -m relay` prints that one line and exits 2. Nothing here falls back
silently to a more open or less bounded relay.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting is present but unusable. The message names it."""


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _machine_memory() -> int:
    """Physical memory, or the container's memory limit when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 4096 * MIB
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_max_bytes() -> int:
    """A safe share of the machine's memory for stored bodies: a quarter, at least 64 MiB."""
    return max(64 * MIB, _machine_memory() // 4)


@dataclass(frozen=True)
class Knob:
    env: str
    flag: str
    kind: str  # "int", "float", "str", "bool"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None


# The single table of settings. README and docs/operations.md describe the same list;
# tests/test_settings.py checks that they do.
KNOBS: tuple[Knob, ...] = (
    Knob(
        "HIVE_RELAY_ADDR",
        "--addr",
        "str",
        "0.0.0.0:8443",
        "host:port to listen on ($PORT, when set, wins and listens on 0.0.0.0:$PORT)",
    ),
    Knob(
        "HIVE_RELAY_STORE",
        "--store",
        "str",
        "memory://",
        "store URL: memory:// or redis://… / rediss://…",
    ),
    Knob(
        "HIVE_RELAY_DATA_DIR",
        "--data-dir",
        "str",
        "",
        "snapshot directory for the memory store (empty = no snapshots)",
    ),
    Knob(
        "HIVE_RELAY_SNAPSHOT_INTERVAL",
        "--snapshot-interval",
        "float",
        30.0,
        "seconds between snapshots when something changed",
        1,
        86400,
    ),
    Knob(
        "HIVE_RELAY_MAX_BODY_BYTES",
        "--max-body-bytes",
        "int",
        4 * MIB,
        "largest request body in bytes",
        64,
        1 << 30,
    ),
    Knob(
        "HIVE_RELAY_MAX_PAGE_BYTES",
        "--max-page-bytes",
        "int",
        8 * MIB,
        "bytes of rows after which a read page stops (at least one row is returned)",
        1,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_MAX_ENVELOPES",
        "--max-envelopes",
        "int",
        50_000,
        "envelopes retained per workspace (0 = unbounded)",
        0,
        1 << 40,
    ),
    Knob(
        "HIVE_RELAY_RETENTION_DAYS",
        "--retention-days",
        "float",
        0.0,
        "drop envelopes older than this many days (0 = off)",
        0,
        36500,
    ),
    Knob(
        "HIVE_RELAY_MAX_BYTES",
        "--max-bytes",
        "int",
        None,
        "global memory budget: envelopes and workspaces charged what they cost; past it "
        "the oldest envelopes relay-wide are dropped first; side channels get a quarter "
        "on top (default: a quarter of the machine's memory)",
        1024,
        1 << 50,
    ),
    Knob(
        "HIVE_RELAY_PUSH_RATE",
        "--push-rate",
        "float",
        100.0,
        "pushes per second per client (0 = off)",
        0,
        1e9,
    ),
    Knob(
        "HIVE_RELAY_PUSH_BURST",
        "--push-burst",
        "int",
        300,
        "burst of pushes per client above the rate",
        0,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_SIDE_RATE",
        "--side-rate",
        "float",
        10.0,
        "keyring, presence and candidate writes per second per client (0 = off)",
        0,
        1e9,
    ),
    Knob(
        "HIVE_RELAY_SIDE_BURST",
        "--side-burst",
        "int",
        100,
        "burst of keyring, presence and candidate writes per client above the rate",
        0,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_MAX_SSE",
        "--max-sse",
        "int",
        2000,
        "live streams at once (SSE, WebSocket and long-polls together; 0 = unlimited)",
        0,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_MAX_SSE_PER_CLIENT",
        "--max-sse-per-client",
        "int",
        100,
        "live streams at once per client address (0 = unlimited)",
        0,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_STREAM_BUFFER",
        "--stream-buffer",
        "int",
        1024,
        "envelopes a live subscriber may fall behind before it is disconnected",
        1,
        1 << 24,
    ),
    Knob(
        "HIVE_RELAY_STREAM_BUFFER_BYTES",
        "--stream-buffer-bytes",
        "int",
        8 * MIB,
        "bytes of envelopes a live subscriber may fall behind before it is disconnected "
        "(an idle subscriber always takes the next append, however large)",
        1024,
        1 << 40,
    ),
    Knob(
        "HIVE_RELAY_KEEPALIVE_SECS",
        "--keepalive-secs",
        "float",
        25.0,
        "seconds of silence after which a live stream sends a keep-alive",
        0.05,
        3600,
    ),
    Knob(
        "HIVE_RELAY_PRESENCE_TTL",
        "--presence-ttl",
        "float",
        0.0,
        "seconds after which presence and candidate entries expire (0 = never)",
        0,
        1e9,
    ),
    Knob(
        "HIVE_RELAY_MAX_KEYRING",
        "--max-keyring",
        "int",
        1000,
        "keyring blobs retained per workspace",
        1,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_MAX_DEVICES",
        "--max-devices",
        "int",
        1000,
        "presence (and candidate) entries per workspace",
        1,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_MAX_SIDE_BYTES",
        "--max-side-bytes",
        "int",
        256 * 1024,
        "largest keyring blob or presence/candidate entry in bytes",
        16,
        1 << 30,
    ),
    Knob(
        "HIVE_RELAY_MAX_PAIRINGS",
        "--max-pairings",
        "int",
        100_000,
        "pairing codes held at once relay-wide",
        1,
        1 << 31,
    ),
    Knob(
        "HIVE_RELAY_PAIR_RESOLVE_RATE",
        "--pair-resolve-rate",
        "float",
        0.5,
        "pairing-code lookups per second per client (burst 10; 0 = off)",
        0,
        1e9,
    ),
    Knob(
        "HIVE_RELAY_PAIR_CREATE_RATE",
        "--pair-create-rate",
        "float",
        0.5,
        "pairing codes created per second per client (burst 10; 0 = off)",
        0,
        1e9,
    ),
    Knob(
        "HIVE_RELAY_IDLE_WORKSPACE_SECS",
        "--idle-workspace-secs",
        "float",
        3600.0,
        "an empty workspace with no listeners is freed after this many idle seconds",
        1,
        1e9,
    ),
    Knob(
        "HIVE_RELAY_TOKEN_PUBKEY",
        "--token-pubkey",
        "str",
        "",
        "Ed25519 public key (64 hex or base64) that signs hrt1 access tokens; "
        "several, comma-separated, while rotating keys",
    ),
    Knob(
        "HIVE_RELAY_ACCESS_TOKENS",
        "--access-tokens",
        "str",
        "",
        "comma-separated static token allowlist",
    ),
    Knob(
        "HIVE_RELAY_ACCESS_TOKENS_FILE",
        "--access-tokens-file",
        "str",
        "",
        "file with one allowed token per line (# comments allowed)",
    ),
    Knob(
        "HIVE_RELAY_METRICS_TOKEN",
        "--metrics-token",
        "str",
        "",
        "bearer token required for /metrics (empty = public)",
    ),
    Knob(
        "HIVE_RELAY_TRUSTED_PROXIES",
        "--trusted-proxies",
        "str",
        "",
        "comma-separated proxy addresses/CIDRs whose X-Forwarded-For is believed",
    ),
    Knob(
        "HIVE_RELAY_CLIENT_IP_HEADER",
        "--client-ip-header",
        "str",
        "",
        "a header that trusted proxies set to the client address (e.g. Fly-Client-IP); "
        "used instead of X-Forwarded-For when present",
    ),
    Knob(
        "HIVE_RELAY_IPV6_PREFIX",
        "--ipv6-prefix",
        "int",
        64,
        "per-client limits count an IPv6 client by its network of this many bits "
        "(128 = each address alone)",
        1,
        128,
    ),
    Knob(
        "HIVE_RELAY_CORS_ORIGINS",
        "--cors-origins",
        "str",
        "",
        "comma-separated browser origins allowed by CORS (empty = CORS off; * = any)",
    ),
    Knob(
        "HIVE_RELAY_SHUTDOWN_TIMEOUT",
        "--shutdown-timeout",
        "float",
        10.0,
        "seconds a graceful shutdown may take before connections are cut",
        0.1,
        3600,
    ),
    Knob(
        "HIVE_RELAY_LOG_FORMAT", "--log-format", "str", "text", "request log format: text or json"
    ),
    Knob(
        "HIVE_RELAY_LOG_LEVEL",
        "--log-level",
        "str",
        "info",
        "log level: debug, info, warning, error",
    ),
    Knob(
        "HIVE_RELAY_ACCESS_LOG",
        "--access-log",
        "bool",
        True,
        "log one line per request (method, route, status, duration, client)",
    ),
    Knob(
        "HIVE_RELAY_HEADER_LIMIT",
        "--header-limit",
        "int",
        16 * 1024,
        "largest request head (request line and headers) in bytes",
        1024,
        1 << 24,
    ),
    Knob(
        "HIVE_RELAY_KEEPALIVE_TIMEOUT",
        "--keepalive-timeout",
        "float",
        5.0,
        "seconds an idle keep-alive HTTP connection is kept open, and the longest a "
        "request head, or a pause inside a request body, may take",
        1,
        3600,
    ),
    Knob("HIVE_RELAY_BACKLOG", "--backlog", "int", 2048, "listen socket backlog", 16, 1 << 20),
)

_FIELD_BY_ENV = {k.env: k.env.removeprefix("HIVE_RELAY_").lower() for k in KNOBS}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _convert(knob: Knob, raw: str) -> Any:
    text = raw.strip()
    try:
        if knob.kind == "int":
            # Accept 4194304, 4_194_304 and 4MiB-style suffixes an operator might type.
            value: Any = _parse_size(text)
        elif knob.kind == "float":
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("not a finite number")
        elif knob.kind == "bool":
            value = _parse_bool(text)
        else:
            return raw
    except ValueError as exc:
        raise SettingsError(f"{knob.env}: cannot parse {raw!r}: {exc}") from None
    if knob.minimum is not None and value < knob.minimum:
        raise SettingsError(f"{knob.env}: {raw!r} is below the minimum {knob.minimum:g}")
    if knob.maximum is not None and value > knob.maximum:
        raise SettingsError(f"{knob.env}: {raw!r} is above the maximum {knob.maximum:g}")
    return value


_SUFFIXES = {
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 10**6,
    "mb": 10**6,
    "mib": MIB,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1024 * MIB,
}


def _parse_size(text: str) -> int:
    low = text.lower().replace("_", "")
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix) and low[: -len(suffix)].strip().isdigit():
            return int(low[: -len(suffix)]) * _SUFFIXES[suffix]
    if not low.lstrip("-").isdigit():
        raise ValueError("not a whole number")
    return int(low)


@dataclass(frozen=True)
class Settings:
    addr: str = "0.0.0.0:8443"
    store: str = "memory://"
    data_dir: str = ""
    snapshot_interval: float = 30.0
    max_body_bytes: int = 4 * MIB
    max_page_bytes: int = 8 * MIB
    max_envelopes: int = 50_000
    retention_days: float = 0.0
    max_bytes: int = field(default_factory=default_max_bytes)
    push_rate: float = 100.0
    push_burst: int = 300
    side_rate: float = 10.0
    side_burst: int = 100
    max_sse: int = 2000
    max_sse_per_client: int = 100
    stream_buffer: int = 1024
    stream_buffer_bytes: int = 8 * MIB
    keepalive_secs: float = 25.0
    presence_ttl: float = 0.0
    max_keyring: int = 1000
    max_devices: int = 1000
    max_side_bytes: int = 256 * 1024
    max_pairings: int = 100_000
    pair_resolve_rate: float = 0.5
    pair_create_rate: float = 0.5
    idle_workspace_secs: float = 3600.0
    token_pubkey: str = ""
    access_tokens: str = ""
    access_tokens_file: str = ""
    metrics_token: str = ""
    trusted_proxies: str = ""
    client_ip_header: str = ""
    ipv6_prefix: int = 64
    cors_origins: str = ""
    shutdown_timeout: float = 10.0
    log_format: str = "text"
    log_level: str = "info"
    access_log: bool = True
    header_limit: int = 16 * 1024
    keepalive_timeout: float = 5.0
    backlog: int = 2048

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def host(self) -> str:
        return split_addr(self.addr)[0]

    @property
    def port(self) -> int:
        return split_addr(self.addr)[1]

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip())

    def validate(self) -> None:
        split_addr(self.addr)
        scheme = self.store.split("://", 1)[0].lower() if "://" in self.store else ""
        if scheme not in ("memory", "redis", "rediss"):
            raise SettingsError(
                f"HIVE_RELAY_STORE: unknown store {self.store!r} "
                "(use memory:// or redis://host:port/db or rediss://…)"
            )
        if self.log_format not in ("text", "json"):
            raise SettingsError(
                f"HIVE_RELAY_LOG_FORMAT: {self.log_format!r} is not one of text, json"
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(
                f"HIVE_RELAY_LOG_LEVEL: {self.log_level!r} is not one of "
                "debug, info, warning, error"
            )
        parse_networks(self.trusted_proxies)
        for origin in self.cors_origin_list:
            if origin != "*" and "://" not in origin:
                raise SettingsError(
                    f"HIVE_RELAY_CORS_ORIGINS: {origin!r} is not an origin "
                    "(scheme://host[:port]) or *"
                )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Flags win over the environment, which wins over defaults.

        The bind address follows PROTOCOL.md: `$PORT` → `$HIVE_RELAY_ADDR` → default,
        and an explicit `--addr` or `--port` flag wins over both.
        """
        env = os.environ if environ is None else environ
        parser = build_parser()
        args = parser.parse_args(list(argv or []))
        values: dict[str, Any] = {}
        for knob in KNOBS:
            name = _FIELD_BY_ENV[knob.env]
            flag_value = getattr(args, name, None)
            if flag_value is not None:
                values[name] = _convert(knob, str(flag_value))
            elif knob.env in env and env[knob.env].strip() != "":
                values[name] = _convert(knob, env[knob.env])
        if args.port is not None:
            values["addr"] = f"0.0.0.0:{_port_number('--port', str(args.port))}"
        elif args.addr is None and env.get("PORT", "").strip():
            values["addr"] = f"0.0.0.0:{_port_number('PORT', env['PORT'])}"
        return cls(**values)


def _port_number(name: str, text: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        raise SettingsError(f"{name}: {text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}: {port} is not a port number (0–65535)")
    return port


def split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise SettingsError(f"HIVE_RELAY_ADDR: {addr!r} is not host:port")
    host = host.strip("[]")
    return host, _port_number("HIVE_RELAY_ADDR", port)


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise SettingsError(
                f"HIVE_RELAY_TRUSTED_PROXIES: {part!r} is not an IP address or CIDR"
            ) from None
    return tuple(nets)


def _describe_default(knob: Knob) -> str:
    if knob.env == "HIVE_RELAY_MAX_BYTES":
        return f"{default_max_bytes()} (a quarter of this machine's memory)"
    if knob.default == "":
        return "unset"
    return str(knob.default)


def build_parser(
    add_extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay",
        description=(
            "hive-relay: a content-blind relay for end-to-end-encrypted event envelopes. "
            "Every flag has an environment variable; flags win. "
            "`python -m relay token --help` manages signed access tokens."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for knob in KNOBS:
        parser.add_argument(
            knob.flag,
            dest=_FIELD_BY_ENV[knob.env],
            default=None,
            metavar=knob.kind.upper() if knob.kind != "str" else "VALUE",
            help=f"{knob.help} [env {knob.env}; default {_describe_default(knob)}]",
        )
    parser.add_argument(
        "--port",
        default=None,
        metavar="PORT",
        help="listen on 0.0.0.0:PORT [env PORT; wins over HIVE_RELAY_ADDR]",
    )
    if add_extra is not None:
        add_extra(parser)
    return parser
