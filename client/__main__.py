"""`python -m client`: send, tail, rotate, keygen, derive-key and probe from a shell.

Every connection flag has an environment variable (the same ones
`Workspace.from_env` reads); a flag wins over its variable. Exit codes: 0
success, 1 failure (the message says what to do), 2 usage or configuration
error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TextIO, TypeVar

import anyio
import msgspec

from client import __version__
from client._requests import check_base_url, check_workspace_id
from client.crypto import (
    Device,
    WorkspaceKey,
    coerce_public_key,
    open_envelope,
    parse_envelope,
)
from client.cursor import FileCursorStore
from client.errors import (
    BadRequest,
    BadResponse,
    ConfigError,
    CryptoError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    RelayFull,
    Unauthorized,
    Unavailable,
    Unreachable,
    Unsupported,
)
from client.events import Event, Gap, KeyMissing, RelayReset, Unopenable
from client.http import DEFAULT_MAX_BODY_BYTES, AsyncRelayClient
from client.workspace import Workspace, device_from_env, parse_epoch, parse_max_body

T = TypeVar("T")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# flag dest -> environment variable
_ENV_FLAGS = {
    "url": "HIVE_RELAY_URL",
    "workspace": "HIVE_WORKSPACE",
    "key": "HIVE_WORKSPACE_KEY",
    "token": "HIVE_RELAY_ACCESS_TOKEN",
    "key_epoch": "HIVE_WORKSPACE_KEY_EPOCH",
    "device_id": "HIVE_DEVICE_ID",
    "device_key": "HIVE_DEVICE_KEY",
    "cursor_file": "HIVE_CURSOR_FILE",
    "max_body_bytes": "HIVE_RELAY_MAX_BODY_BYTES",
}


class CliError(Exception):
    """A failure with an actionable message and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection (flags win over environment variables)")
    group.add_argument("--url", help="relay base URL [env HIVE_RELAY_URL]")
    group.add_argument("--workspace", "-w", help="workspace id [env HIVE_WORKSPACE]")
    group.add_argument(
        "--key",
        help="workspace key: 64 hex, else a passphrase [env HIVE_WORKSPACE_KEY; prefer the env]",
    )
    group.add_argument("--token", help="access token [env HIVE_RELAY_ACCESS_TOKEN]")
    group.add_argument(
        "--key-epoch", help="key epoch of --key (default 0) [env HIVE_WORKSPACE_KEY_EPOCH]"
    )
    group.add_argument(
        "--device-id", help="this device's id, to adopt rotated keys [env HIVE_DEVICE_ID]"
    )
    group.add_argument(
        "--device-key", help="this device's X25519 secret, 64 hex [env HIVE_DEVICE_KEY]"
    )
    group.add_argument(
        "--max-body-bytes",
        metavar="N",
        help="the relay's body limit, checked before sending (default 4194304; 0: no check) "
        "[env HIVE_RELAY_MAX_BODY_BYTES]",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="hive-relay client: seal, send and follow end-to-end-encrypted envelopes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_options()

    send = sub.add_parser(
        "send", parents=[conn], help="seal one JSON value and append it; prints its seq"
    )
    send.add_argument(
        "json",
        nargs="?",
        default="-",
        metavar="JSON|-",
        help="the JSON value to send (default -: read standard input)",
    )
    send.add_argument(
        "--format",
        choices=("hive", "compact"),
        default="hive",
        help="sealed body format (default hive: readable by Hive devices)",
    )

    tail = sub.add_parser(
        "tail", parents=[conn], help='print {"seq": N, "event": ...} per opened envelope'
    )
    tail.add_argument(
        "--after",
        type=int,
        default=None,
        metavar="N",
        help="start after seq N (default: the cursor file, else 0)",
    )
    tail.add_argument("--once", action="store_true", help="exit once caught up")
    tail.add_argument("--cursor-file", help="persist the cursor here [env HIVE_CURSOR_FILE]")
    tail.add_argument(
        "--transport",
        default="auto",
        choices=("auto", "sse", "nudge", "longpoll", "poll"),
        help="live transport (default auto: the best the relay offers)",
    )

    rotate = sub.add_parser(
        "rotate",
        parents=[conn],
        help="seal a new key epoch to the listed devices (removes everyone else); prints it",
    )
    rotate.add_argument(
        "members",
        nargs="+",
        metavar="NAME=PUBLIC_HEX",
        help="every device that stays: its id and X25519 public key (keygen --device)",
    )

    keygen = sub.add_parser("keygen", help="print a new random workspace key (64 hex)")
    keygen.add_argument(
        "--device", action="store_true", help="print a new X25519 device key pair as JSON instead"
    )

    derive = sub.add_parser("derive-key", help="print the workspace key a passphrase derives")
    derive.add_argument(
        "passphrase", metavar="PASSPHRASE", help="the passphrase (- reads it from standard input)"
    )

    sub.add_parser(
        "probe",
        parents=[conn],
        help="check the relay is reachable and accepts this token (and key)",
    )
    return parser


def _resolve_env(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Fill unset flags from their variables, remembering which one the user set."""
    sources: dict[str, str] = {}
    for dest, var in _ENV_FLAGS.items():
        if not hasattr(args, dest):
            continue
        if getattr(args, dest) not in (None, ""):
            sources[dest] = _flag(dest)
            continue
        value = environ.get(var, "")
        # Keys are taken raw (a passphrase may have meaningful spaces); others stripped.
        value = value if dest == "key" else value.strip()
        setattr(args, dest, value or None)
        if value:
            sources[dest] = var
    args.sources = sources


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _setting(args: argparse.Namespace, dest: str) -> str:
    """The flag or variable the user set `dest` with (the variable when unset)."""
    sources: dict[str, str] = getattr(args, "sources", {})
    return sources.get(dest) or _ENV_FLAGS[dest]


def _require(args: argparse.Namespace, dest: str) -> str:
    value = getattr(args, dest, None)
    if not value:
        raise CliError(f"{_flag(dest)} or {_ENV_FLAGS[dest]} is required", EXIT_USAGE)
    return str(value)


def _checked(args: argparse.Namespace, dest: str, check: Callable[[str], T]) -> T:
    try:
        return check(_require(args, dest))
    except ValueError as exc:
        raise CliError(f"{_setting(args, dest)}: {exc}", EXIT_USAGE) from None


def _workspace(args: argparse.Namespace, **extra: Any) -> Workspace:
    env = {
        k: v
        for k, v in {
            "HIVE_DEVICE_ID": args.device_id,
            "HIVE_DEVICE_KEY": args.device_key,
        }.items()
        if v
    }
    url = _checked(args, "url", check_base_url)
    workspace = _checked(args, "workspace", check_workspace_id)
    key = _checked(args, "key", WorkspaceKey.parse)
    key_epoch = 0
    if args.key_epoch is not None:
        key_epoch = parse_epoch(args.key_epoch, _setting(args, "key_epoch"))
    device = device_from_env(
        env, id_name=_setting(args, "device_id"), key_name=_setting(args, "device_key")
    )
    if "client" not in extra:
        extra["max_body_bytes"] = _max_body(args)
    try:
        return Workspace(
            url, workspace, key, token=args.token, key_epoch=key_epoch, device=device, **extra
        )
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _max_body(args: argparse.Namespace) -> int | None:
    if args.max_body_bytes is None:
        return DEFAULT_MAX_BODY_BYTES
    return parse_max_body(args.max_body_bytes, _setting(args, "max_body_bytes"))


def _read_json_arg(text: str, stdin: TextIO) -> bytes:
    raw = (stdin.read() if text == "-" else text).strip().encode("utf-8")
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise CliError(f"not valid JSON: {exc}", EXIT_USAGE) from None
    return raw


def explain(
    exc: RelayError,
    *,
    url: str,
    workspace: str | None = None,
    args: argparse.Namespace | None = None,
) -> str:
    """One actionable sentence for a relay failure, naming the settings as the user set them."""

    def setting(dest: str) -> str:
        return _setting(args, dest) if args is not None else _ENV_FLAGS[dest]

    where = f"workspace {workspace!r}" if workspace else "this workspace"
    if isinstance(exc, Unreachable):
        message = exc.message.replace("set max_body_bytes", f"set {setting('max_body_bytes')}")
        return (
            f"{message}. Check {setting('url')} (scheme, host and port) and that the "
            "relay is running."
        )
    if isinstance(exc, Unauthorized):
        if exc.token_sent is False:
            return (
                f"no access token was sent, and the relay at {url} requires one. Set "
                f"{setting('token')} to a token this relay accepts."
            )
        return (
            f"{exc.message} (the token from {setting('token')}). Use a token this relay "
            "accepts; signed tokens also expire."
        )
    if isinstance(exc, Forbidden):
        return (
            f"the token from {setting('token')} is valid but does not grant {where} "
            f"({exc.message}). Use a token whose ws claim covers it."
        )
    if isinstance(exc, NotFound):
        return (
            f"{url} answered 404 ({exc.message}): {setting('url')} does not look like a hive "
            "relay's base URL (give it without /v1)."
        )
    if isinstance(exc, RelayFull):
        return (
            f"the relay is out of room ({exc.message}): a smaller body does not help. Its "
            "operator can raise HIVE_RELAY_MAX_BYTES."
        )
    if isinstance(exc, PayloadTooLarge):
        return (
            f"{exc.message}. If the relay allows larger bodies, set "
            f"{setting('max_body_bytes')} to its limit."
        )
    if isinstance(exc, BadRequest):
        if exc.code == "invalid_workspace":
            return f"the relay refused {where} ({exc.message}). Check {setting('workspace')}."
        return f"the relay refused the request as malformed ({exc})."
    if isinstance(exc, RateLimited):
        wait = f" Retry in {exc.retry_after:g} s." if exc.retry_after is not None else ""
        return f"the relay is rate-limiting this client ({exc}).{wait}"
    if isinstance(exc, Unavailable):
        return (
            f"the relay is up but cannot serve ({exc}). Check its store "
            "(HIVE_RELAY_STORE, Redis) and its logs."
        )
    if isinstance(exc, BadResponse):
        return f"{url} answered something that is not the hive relay protocol ({exc})."
    return f"the relay refused the request: {exc}"


# --------------------------------------------------------------------------- commands


async def _send(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    body = _read_json_arg(args.json, stdin)
    # A person is waiting: retry transient failures briefly (same idempotency key), then say why.
    ws = _workspace(args, send_attempts=3)
    async with ws:
        try:
            seq = await ws.send(body, format=args.format)
        except RelayError as exc:
            raise CliError(
                explain(exc, url=ws.client.base_url, workspace=ws.workspace, args=args)
            ) from None
    print(seq, file=out)
    return EXIT_OK


async def _tail(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    store = FileCursorStore(args.cursor_file) if args.cursor_file else None
    ws = _workspace(args, cursor_store=store, transport=args.transport)
    code = EXIT_OK
    unopened: dict[int, int] = {}  # key epoch (-1: not sealed or malformed) -> count
    mode = "reading" if args.once else "connecting to"
    print(f"{mode} {ws.client.base_url} (workspace {ws.workspace!r})", file=err)
    err.flush()
    async with ws:
        try:
            async for item in ws.events(after=args.after, live=not args.once):
                if isinstance(item, Event):
                    line = msgspec.json.encode({"seq": item.seq, "event": item.data})
                    out.write(line.decode("utf-8") + "\n")
                    out.flush()
                elif isinstance(item, Unopenable):
                    epoch = _sealed_epoch(item)
                    unopened[epoch] = unopened.get(epoch, 0) + 1
                    print(f"seq {item.seq}: {item.error}", file=err)
                elif isinstance(item, KeyMissing):
                    print(
                        f"seq {item.seq}: sealed with key epoch {item.epoch}, which this key "
                        f"does not cover; stopped here. Set {_setting(args, 'key')} and "
                        f"{_setting(args, 'key_epoch')} to that epoch's key, or "
                        f"{_setting(args, 'device_id')} and {_setting(args, 'device_key')} "
                        "to adopt rotated keys.",
                        file=err,
                    )
                    code = EXIT_FAIL
                elif isinstance(item, Gap):
                    print(
                        f"gap: the relay dropped envelopes after seq {item.after} before they "
                        f"were read; continuing from seq {item.oldest}",
                        file=err,
                    )
                elif isinstance(item, RelayReset):
                    print(
                        f"the relay's history changed (epoch {item.previous} -> {item.current}); "
                        "envelopes it had acknowledged may be lost",
                        file=err,
                    )
                err.flush()
            await ws.commit()
        except RelayError as exc:
            raise CliError(
                explain(exc, url=ws.client.base_url, workspace=ws.workspace, args=args)
            ) from None
        finally:
            if unopened:
                total = sum(unopened.values())
                detail = "; ".join(
                    f"key epoch {epoch}: {n}" if epoch >= 0 else f"not sealed or malformed: {n}"
                    for epoch, n in sorted(unopened.items())
                )
                noun = "envelope" if total == 1 else "envelopes"
                print(f"{total} {noun} could not be opened ({detail})", file=err)
                err.flush()
    if unopened:
        code = EXIT_FAIL
    return code


def _sealed_epoch(item: Unopenable) -> int:
    try:
        return parse_envelope(item.body).epoch
    except CryptoError:
        return -1


def _parse_members(pairs: Sequence[str]) -> dict[str, str]:
    members: dict[str, str] = {}
    for pair in pairs:
        name, sep, public = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CliError(
                f"member {pair!r}: expected name=public-hex (a device id, '=', and its "
                "X25519 public key as 64 hex characters from keygen --device)",
                EXIT_USAGE,
            )
        try:
            coerce_public_key(public)
        except ValueError:
            raise CliError(
                f"member {name!r}: the public key must be 64 hex characters (name=public-hex, "
                "the public from keygen --device)",
                EXIT_USAGE,
            ) from None
        if name in members:
            raise CliError(f"member {name!r} is listed twice", EXIT_USAGE)
        members[name] = public.strip()
    return members


async def _rotate(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    members = _parse_members(args.members)
    ws = _workspace(args, send_attempts=3)
    async with ws:
        try:
            epoch = await ws.rotate(members)
        except RelayError as exc:
            raise CliError(
                explain(exc, url=ws.client.base_url, workspace=ws.workspace, args=args)
            ) from None
    if ws.device is None:
        print(
            f"note: no device key given, so this program keeps no copy of key epoch {epoch}; "
            "the members adopt it with their device keys",
            file=err,
        )
    elif ws.device.device_id not in members:
        print(
            f"note: device {ws.device.device_id!r} (this one) is not among the members: it cannot "
            f"open envelopes sealed under key epoch {epoch}",
            file=err,
        )
    print(epoch, file=out)
    return EXIT_OK


def _keygen(args: argparse.Namespace, out: TextIO) -> int:
    if args.device:
        device = Device.generate("device")
        line = msgspec.json.encode({"secret": device.secret_hex(), "public": device.public_hex})
        print(line.decode(), file=out)
    else:
        print(WorkspaceKey.generate().hex(), file=out)
    return EXIT_OK


def _derive_key(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    passphrase = stdin.readline().rstrip("\r\n") if args.passphrase == "-" else args.passphrase
    try:
        print(WorkspaceKey.from_passphrase(passphrase).hex(), file=out)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return EXIT_OK


_PROBE_AFTER = 1 << 63  # past any real seq: the read returns no rows, only headers


async def _probe(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    url = _checked(args, "url", check_base_url)
    workspace: str | None = None
    if args.workspace:
        workspace = _checked(args, "workspace", check_workspace_id)
    client = AsyncRelayClient(url, args.token, max_body_bytes=_max_body(args))
    async with client:
        try:
            healthy = await client.health()
        except RelayError as exc:
            raise CliError(explain(exc, url=client.base_url, args=args)) from None
        if not healthy:
            raise CliError(
                f"the relay at {client.base_url} is up but its store is unavailable (503). "
                "Check HIVE_RELAY_STORE (Redis reachable?) and the relay's logs."
            )
        print(f"ok: relay reachable at {client.base_url}", file=out)
        if not workspace:
            print(
                "skip: no workspace given (HIVE_WORKSPACE), so the token was not checked", file=out
            )
            return EXIT_OK
        try:
            page = await client.fetch(workspace, _PROBE_AFTER, limit=1)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        except RelayError as exc:
            raise CliError(
                explain(exc, url=client.base_url, workspace=workspace, args=args)
            ) from None
        auth = "token accepted" if args.token else "no token needed"
        print(f"ok: {auth} for workspace {workspace!r} (head seq {page.head})", file=out)
        await _probe_live(client, workspace, out)
        if args.key:
            return await _probe_key(args, client, workspace, page.head, out, err)
    return EXIT_OK


async def _probe_live(client: AsyncRelayClient, workspace: str, out: TextIO) -> None:
    try:
        async with client.events(workspace, bodies=True, after=_PROBE_AFTER):
            print("ok: live event stream offered (SSE)", file=out)
    except Unsupported:
        print("note: no event stream on this relay; followers will poll", file=out)
    except RelayError as exc:
        print(f"note: the event stream failed ({exc}); followers will fall back", file=out)


async def _probe_key(
    args: argparse.Namespace,
    client: AsyncRelayClient,
    workspace: str,
    head: int | None,
    out: TextIO,
    err: TextIO,
) -> int:
    ws = _workspace(args, client=client)
    # As `send` does: adopt the rotations sealed to this device (or warn without one).
    try:
        await ws.refresh_keyring()
    except RelayError as exc:
        raise CliError(explain(exc, url=client.base_url, workspace=workspace, args=args)) from None
    print(f"ok: new envelopes are sealed with key epoch {ws.keyring.current_epoch}", file=out)
    if not head:
        print("skip: the workspace is empty, so the key was not checked", file=out)
        return EXIT_OK
    page = await client.fetch(workspace, head - 1, limit=1)
    if not page.rows:
        print("skip: the newest envelope is no longer retained; key not checked", file=out)
        return EXIT_OK
    row = page.rows[0]
    try:
        opened = open_envelope(row.body, ws.keyring, workspace=workspace)
    except CryptoError as exc:
        print(
            f"FAIL: the key does not open the newest envelope (seq {row.seq}): {exc}. "
            f"Check {_setting(args, 'key')}, or give this device's identity "
            f"({_setting(args, 'device_id')} and {_setting(args, 'device_key')}) to adopt "
            "rotated keys.",
            file=err,
        )
        return EXIT_FAIL
    print(f"ok: the key opens the newest envelope (seq {row.seq}, epoch {opened.epoch})", file=out)
    return EXIT_OK


AsyncCommand = Callable[[argparse.Namespace, TextIO, TextIO, TextIO], Coroutine[Any, Any, int]]
_ASYNC: dict[str, AsyncCommand] = {
    "send": _send,
    "tail": _tail,
    "probe": _probe,
    "rotate": _rotate,
}


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


@contextlib.contextmanager
def _log_to(err: TextIO, level: int) -> Iterator[None]:
    """The SDK's log records (warnings; with INFO, what `tail` is doing) as lines on `err`."""
    logger = logging.getLogger("client")
    handler = logging.StreamHandler(err)
    handler.setFormatter(_StderrFormatter())
    handler.setLevel(level)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous) if previous != logging.NOTSET else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the CLI; returns the exit code."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    args = build_parser().parse_args(argv)
    _resolve_env(args, os.environ if environ is None else environ)
    try:
        if args.command == "keygen":
            return _keygen(args, out)
        if args.command == "derive-key":
            return _derive_key(args, out, inp)
        command = _ASYNC[args.command]
        with _log_to(err, logging.INFO if args.command == "tail" else logging.WARNING):
            return anyio.run(command, args, out, err, inp)
    except CliError as exc:
        print(f"error: {exc}", file=err)
        return exc.code
    except ConfigError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output went to a closed pipe (`| head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
