"""Every setting of the relay, each declared once: name, type, default, bounds, help.

A setting is a field of `Settings` declared with `setting(...)`. Its environment
variable (`HIVE_RELAY_` + the name in capitals), its flag (`--` + the name with
dashes), the `--help` line, parsing and validation, and the README table check
(tests/test_settings.py) all read that one declaration, through `KNOBS`.

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


# ------------------------------------------------------------ value checks
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


# The store URL's scheme → the kind of store it opens. The one place a scheme is checked.
STORE_SCHEMES = {
    "memory": "memory",
    "redis": "redis",
    "rediss": "redis",
    "redis+sentinel": "redis",
    "rediss+sentinel": "redis",
    "redis+cluster": "redis",
    "rediss+cluster": "redis",
}


def store_kind_of(url: str) -> str:
    """ "memory" or "redis", from a store URL; SettingsError for any other URL."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    kind = STORE_SCHEMES.get(scheme)
    if kind is None:
        raise SettingsError(
            f"HIVE_RELAY_STORE: unknown store {url!r} "
            "(use memory:// or redis://host:port/db or rediss://… "
            "or redis+sentinel://host:port[,host:port…]/service "
            "or redis+cluster://host:port[,host:port…])"
        )
    if kind == "redis":
        # The URL's form (hosts, service name, db) is checked without importing redis.
        from relay.store.redis_url import parse_redis_url

        parse_redis_url(url)
    return kind


def parse_origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise SettingsError(
                f"HIVE_RELAY_CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port]) or *"
            )
    return origins


def _one_of(*choices: str, fold_case: bool = False) -> Callable[[Knob, str], None]:
    def check(knob: Knob, value: str) -> None:
        if (value.lower() if fold_case else value) not in choices:
            raise SettingsError(f"{knob.env}: {value!r} is not one of {', '.join(choices)}")

    return check


def _check_with(parse: Callable[[str], object]) -> Callable[[Knob, str], None]:
    """A check from a parser that raises SettingsError naming the setting itself."""

    def check(knob: Knob, value: str) -> None:
        parse(value)

    return check


# ------------------------------------------------------------ declarations
KINDS = ("int", "float", "str", "bool")


@dataclass(frozen=True)
class Knob:
    """One setting, as its `Settings` field declares it."""

    name: str  # the Settings field
    kind: str  # one of KINDS: how the environment's or the flag's text is parsed
    default: Any  # None when computed at start-up (see `default_text`)
    help: str
    minimum: float | None = None
    maximum: float | None = None
    # A check of the value beyond its type and bounds; runs however Settings is made.
    check: Callable[[Knob, Any], None] | None = None

    @property
    def env(self) -> str:
        return "HIVE_RELAY_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(
    default: Any,
    help: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    check: Callable[[Knob, Any], None] | None = None,
    computed: Callable[[], Any] | None = None,
) -> Any:
    """Declare a `Settings` field: its default, help, bounds and check (`KNOBS` reads them).

    `computed` makes the default a function of the machine, evaluated per `Settings()`;
    `default` is then None.
    """
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "check": check}
    if computed is not None:
        return field(default_factory=computed, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    addr: str = setting(
        "0.0.0.0:8443",
        "host:port to listen on ($PORT, when set, wins and listens on 0.0.0.0:$PORT)",
        check=_check_with(split_addr),
    )
    store: str = setting(
        "memory://",
        "store URL: memory://, redis://… / rediss://…, redis+sentinel://host:port,…/service, "
        "or redis+cluster://host:port,…",
        check=_check_with(store_kind_of),
    )
    redis_min_replicas: int = setting(
        0,
        "Redis store: replicas that must hold a write before it is acknowledged (WAIT; 0 = off)",
        0,
        16,
    )
    redis_wait_ms: int = setting(
        500,
        "Redis store: milliseconds a write waits for those replicas before answering 503",
        1,
        60000,
    )
    data_dir: str = setting(
        "",
        "directory for the memory store's snapshots and write-ahead journal "
        "(empty = memory only, nothing kept across restarts)",
    )
    snapshot_interval: float = setting(
        30.0, "seconds between snapshots (journal checkpoints) when something changed", 1, 86400
    )
    fsync: str = setting(
        "always",
        "when the journal is synced to disk: always (before each answer), everysec "
        "(once a second) or off (the operating system decides)",
        check=_one_of("always", "everysec", "off"),
    )
    journal_repair: str = setting(
        "off",
        "off, or truncate: start despite a damaged journal record, keeping everything "
        "before it (the epoch changes)",
        check=_one_of("off", "truncate"),
    )
    journal_segment_bytes: int = setting(
        64 * MIB, "size at which the journal starts a new segment file", 4096, 1 << 40
    )
    journal_max_bytes: int = setting(
        1 << 30,
        "journal bytes after which a snapshot (checkpoint) is written early",
        4096,
        1 << 50,
    )
    journal_max_age: float = setting(
        3600.0,
        "seconds after which journal records not yet covered by a snapshot force one",
        1,
        1e9,
    )
    max_body_bytes: int = setting(4 * MIB, "largest request body in bytes", 64, 1 << 30)
    max_page_bytes: int = setting(
        8 * MIB,
        "bytes of rows after which a read page stops (at least one row is returned)",
        1,
        1 << 31,
    )
    max_envelopes: int = setting(
        50_000, "envelopes retained per workspace (0 = unbounded)", 0, 1 << 40
    )
    retention_days: float = setting(
        0.0, "drop envelopes older than this many days (0 = off)", 0, 36500
    )
    max_bytes: int = setting(
        None,
        "global memory budget: envelopes and workspaces charged what they cost; past it "
        "the oldest envelopes relay-wide are dropped first; side channels get a quarter "
        "on top (default: a quarter of the machine's memory)",
        1024,
        1 << 50,
        computed=default_max_bytes,
    )
    push_rate: float = setting(100.0, "pushes per second per client (0 = off)", 0, 1e9)
    push_burst: int = setting(300, "burst of pushes per client above the rate", 0, 1 << 31)
    side_rate: float = setting(
        10.0,
        "keyring, presence and candidate writes per second per client (0 = off)",
        0,
        1e9,
    )
    side_burst: int = setting(
        100,
        "burst of keyring, presence and candidate writes per client above the rate",
        0,
        1 << 31,
    )
    max_sse: int = setting(
        2000,
        "live streams at once (SSE, WebSocket and long-polls together; 0 = unlimited)",
        0,
        1 << 31,
    )
    max_sse_per_client: int = setting(
        100, "live streams at once per client address (0 = unlimited)", 0, 1 << 31
    )
    stream_buffer: int = setting(
        1024,
        "envelopes a live subscriber may fall behind before it is disconnected",
        1,
        1 << 24,
    )
    stream_buffer_bytes: int = setting(
        8 * MIB,
        "bytes of envelopes a live subscriber may fall behind before it is disconnected "
        "(an idle subscriber always takes the next append, however large)",
        1024,
        1 << 40,
    )
    keepalive_secs: float = setting(
        25.0, "seconds of silence after which a live stream sends a keep-alive", 0.05, 3600
    )
    status_sample_secs: float = setting(
        5.0,
        "seconds between samples of the status page's charts (they show the last 15 minutes)",
        0.1,
        60,
    )
    max_status_streams: int = setting(
        16,
        "status-page sample streams at once, apart from the live-stream caps (4 per client)",
        1,
        10000,
    )
    presence_ttl: float = setting(
        0.0, "seconds after which presence and candidate entries expire (0 = never)", 0, 1e9
    )
    max_keyring: int = setting(1000, "keyring blobs retained per workspace", 1, 1 << 31)
    max_devices: int = setting(1000, "presence (and candidate) entries per workspace", 1, 1 << 31)
    max_side_bytes: int = setting(
        256 * 1024, "largest keyring blob or presence/candidate entry in bytes", 16, 1 << 30
    )
    max_pairings: int = setting(100_000, "pairing codes held at once relay-wide", 1, 1 << 31)
    pair_resolve_rate: float = setting(
        0.5, "pairing-code lookups per second per client (burst 10; 0 = off)", 0, 1e9
    )
    pair_create_rate: float = setting(
        0.5, "pairing codes created per second per client (burst 10; 0 = off)", 0, 1e9
    )
    idle_workspace_secs: float = setting(
        3600.0,
        "an empty workspace with no listeners is freed after this many idle seconds",
        1,
        1e9,
    )
    token_pubkey: str = setting(
        "",
        "Ed25519 public key (64 hex or base64) that signs hrt1 access tokens; "
        "several, comma-separated, while rotating keys",
    )
    token_pubkey_file: str = setting(
        "",
        "file with Ed25519 public keys for hrt1 tokens, one per line (# comments); "
        "reloaded on change or SIGHUP, so keys rotate without a restart",
    )
    revoked_tokens_file: str = setting(
        "",
        "file of revoked signed tokens: a token id (jti) or sub:NAME per line (# comments); "
        "reloaded on change or SIGHUP",
    )
    access_tokens: str = setting("", "comma-separated static token allowlist")
    access_tokens_file: str = setting(
        "",
        "file with one allowed token per line (# comments allowed); reloaded on change or SIGHUP",
    )
    reload_interval: float = setting(
        2.0,
        "seconds between checks of the access files and TLS pair for changes (0 = SIGHUP only)",
        0,
        3600,
    )
    metrics_token: str = setting("", "bearer token required for /metrics (empty = public)")
    trusted_proxies: str = setting(
        "",
        "comma-separated proxy addresses/CIDRs whose X-Forwarded-For is believed",
        check=_check_with(parse_networks),
    )
    client_ip_header: str = setting(
        "",
        "a header that trusted proxies set to the client address (e.g. Fly-Client-IP); "
        "used instead of X-Forwarded-For when present",
    )
    ipv6_prefix: int = setting(
        64,
        "per-client limits count an IPv6 client by its network of this many bits "
        "(128 = each address alone)",
        1,
        128,
    )
    cors_origins: str = setting(
        "",
        "comma-separated browser origins allowed by CORS (empty = CORS off; * = any)",
        check=_check_with(parse_origins),
    )
    tls_cert: str = setting(
        "",
        "PEM certificate (chain) file: serve HTTPS and WSS on the listening port "
        "(with HIVE_RELAY_TLS_KEY; reloaded when the file changes)",
    )
    tls_key: str = setting("", "PEM private key file of HIVE_RELAY_TLS_CERT (unencrypted)")
    hsts: int = setting(
        0,
        "with direct TLS: send Strict-Transport-Security with this max-age in seconds (0 = off)",
        0,
        1 << 31,
    )
    shutdown_timeout: float = setting(
        10.0, "seconds a graceful shutdown may take before connections are cut", 0.1, 3600
    )
    log_format: str = setting(
        "text", "request log format: text or json", check=_one_of("text", "json")
    )
    log_level: str = setting(
        "info",
        "log level: debug, info, warning, error",
        check=_one_of("debug", "info", "warning", "error", fold_case=True),
    )
    access_log: bool = setting(
        True, "log one line per request (method, route, status, duration, client)"
    )
    header_limit: int = setting(
        16 * 1024, "largest request head (request line and headers) in bytes", 1024, 1 << 24
    )
    keepalive_timeout: float = setting(
        5.0,
        "seconds an idle keep-alive HTTP connection is kept open, and the longest a "
        "request head, or a pause inside a request body, may take",
        1,
        3600,
    )
    backlog: int = setting(2048, "listen socket backlog", 16, 1 << 20)
    workers: int = setting(
        1,
        "relay processes sharing one listening socket (more than 1 needs the Redis store); "
        "stream, connection and rate limits apply per worker",
        1,
        64,
    )

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
    def store_kind(self) -> str:
        """ "memory" or "redis": which store `store` opens."""
        return store_kind_of(self.store)

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return parse_origins(self.cors_origins)

    def validate(self) -> None:
        """Each setting's own check, however these settings were made.

        Bounds are checked where text becomes a number (`load`): settings made in code
        (tests, embedding) may go past them.
        """
        for knob in KNOBS:
            if knob.check is not None:
                knob.check(knob, getattr(self, knob.name))
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = (
                ("HIVE_RELAY_TLS_CERT", "HIVE_RELAY_TLS_KEY")
                if self.tls_cert
                else ("HIVE_RELAY_TLS_KEY", "HIVE_RELAY_TLS_CERT")
            )
            raise SettingsError(
                f"{missing}: must be set with {given} (TLS needs both the certificate and its key)"
            )
        if self.workers > 1 and self.store_kind == "memory":
            raise SettingsError(
                f"HIVE_RELAY_WORKERS: {self.workers} workers need a shared store; "
                "the memory store lives in one process (set HIVE_RELAY_STORE=redis://… "
                "or HIVE_RELAY_WORKERS=1)"
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
            flag_value = getattr(args, knob.name)
            if flag_value is not None:
                values[knob.name] = _convert(knob, flag_value)
            elif knob.env in env and env[knob.env].strip() != "":
                values[knob.name] = _convert(knob, env[knob.env])
        if args.port is not None:
            values["addr"] = f"0.0.0.0:{_port_number('--port', args.port)}"
        elif args.addr is None and env.get("PORT", "").strip():
            values["addr"] = f"0.0.0.0:{_port_number('PORT', env['PORT'])}"
        return cls(**values)


def _knobs() -> tuple[Knob, ...]:
    knobs = []
    for f in dataclasses.fields(Settings):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        assert kind in KINDS, f"Settings.{f.name}: a setting is one of {KINDS}"
        default = None if f.default is dataclasses.MISSING else f.default
        knobs.append(Knob(f.name, kind, default, **f.metadata))
    return tuple(knobs)


# Every setting, in declaration order: what --help, load() and the docs checks walk.
KNOBS: tuple[Knob, ...] = _knobs()


# ------------------------------------------------------------ parsing text
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


# ------------------------------------------------------------ --help
def default_text(knob: Knob) -> str:
    """The default as --help shows it."""
    if knob.default is None:
        return f"{default_max_bytes()} (a quarter of this machine's memory)"
    if knob.default == "":
        return "unset"
    return str(knob.default)


def _bound_text(knob: Knob, bound: float) -> str:
    return str(int(bound)) if knob.kind == "int" else f"{bound:g}"


def _help(knob: Knob) -> str:
    extra = f"env {knob.env}; default {default_text(knob)}"
    if knob.minimum is not None and knob.maximum is not None:
        extra += f"; {_bound_text(knob, knob.minimum)} to {_bound_text(knob, knob.maximum)}"
    return f"{knob.help} [{extra}]"


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
            dest=knob.name,
            default=None,
            metavar=knob.kind.upper() if knob.kind != "str" else "VALUE",
            help=_help(knob),
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
