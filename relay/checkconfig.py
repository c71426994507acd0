"""`python -m relay check-config [flags]`: what `nginx -t` gives operators, for the relay.

It resolves the settings exactly as `python -m relay` would (the same flags,
environment and defaults, through `Settings.load`), reads every file start-up
reads (the access files; the data directory is checked to be a writable
directory), and prints the resolved configuration without secrets. A problem
is the one line start-up would print (`hive-relay: …`) and exit status 2, so
a deploy script can run it before a SIGHUP or a restart:

    python -m relay check-config && systemctl reload hive-relay

Other checks (the TLS certificate, say) join through `CHECKS`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from relay.access import AccessState, access_from_settings, ignored_settings
from relay.settings import KNOBS, Knob, Settings, SettingsError, build_parser, default_text
from relay.store.redis_url import _redact

# Settings whose value is a secret: shown as set/unset (and a count), never as text.
SECRETS = frozenset({"access_tokens", "metrics_token"})

# Each check reads what start-up reads; it raises SettingsError or returns warnings.
Check = Callable[[Settings], list[str]]


def _check_access(settings: Settings) -> list[str]:
    access_from_settings(settings)
    warnings = [f"{name} is ignored: {why}" for name, why in ignored_settings(settings)]
    path = settings.access_tokens_file.strip()
    if path and not any(
        n == "HIVE_RELAY_ACCESS_TOKENS_FILE" for n, _ in ignored_settings(settings)
    ):
        text = Path(path).read_bytes()
        if text and not text.endswith(b"\n"):
            warnings.append(
                f"HIVE_RELAY_ACCESS_TOKENS_FILE: {path!r} does not end with a newline: "
                "start-up takes it, but a reload refuses it as half-written"
            )
    return warnings


def _check_data_dir(settings: Settings) -> list[str]:
    if not settings.data_dir:
        return []
    if settings.store_kind != "memory":
        return ["HIVE_RELAY_DATA_DIR is ignored: snapshots apply to the memory store only"]
    path = Path(settings.data_dir)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "Permission denied"
    if problem is not None:
        raise SettingsError(
            f"HIVE_RELAY_DATA_DIR: {str(path)!r} is not a writable directory ({problem})"
        )
    return [] if existing == path else [f"HIVE_RELAY_DATA_DIR: {str(path)!r} will be created"]


def _check_tls(settings: Settings) -> list[str]:
    """The certificate pair as start-up loads it (relay.app.open_tls), and HSTS."""
    if not settings.tls_cert:
        if settings.hsts:
            return [
                "HIVE_RELAY_HSTS is ignored: it is sent only when the relay serves TLS itself "
                "(HIVE_RELAY_TLS_CERT)"
            ]
        return []
    import time

    from relay.app import open_tls

    certificate = open_tls(settings).certificate
    notes = [f"TLS: serving {certificate.describe()}"]
    days = (certificate.not_after - time.time()) / 86400
    if days < 14:
        notes.append(f"TLS: the certificate expires in {days:.1f} days; renew it")
    return notes


CHECKS: list[Check] = [_check_access, _check_data_dir, _check_tls]


def _sources(argv: Sequence[str], environ: dict[str, str]) -> dict[str, str]:
    """Where each setting's value came from: flag, environment or default."""
    args = build_parser().parse_args(list(argv))
    out = {}
    for knob in KNOBS:
        if getattr(args, knob.name) is not None:
            out[knob.name] = "flag"
        elif environ.get(knob.env, "").strip():
            out[knob.name] = "env"
        else:
            out[knob.name] = "default"
    if args.port is not None:
        out["addr"] = "flag --port"
    elif args.addr is None and environ.get("PORT", "").strip():
        out["addr"] = "env PORT"
    return out


def shown(knob: Knob, value: object) -> str:
    """A setting's value as check-config prints it: secrets and passwords hidden."""
    if knob.name in SECRETS:
        if not value:
            return "unset"
        if knob.name == "access_tokens":
            n = len([t for t in str(value).split(",") if t.strip()])
            return f"set ({n} token(s), not shown)"
        return "set (not shown)"
    if knob.name == "store":
        return _redact(str(value))
    if value == "":
        return "unset"
    return str(value)


def render(settings: Settings, access: AccessState, sources: dict[str, str]) -> str:
    width = max(len(k.env) for k in KNOBS)
    lines = [f"{'setting':<{width}}  {'value':<30}  source"]
    for knob in KNOBS:
        value = getattr(settings, knob.name)
        text = shown(knob, value)
        source = sources.get(knob.name, "default")
        if knob.default is None and source == "default":
            text = f"{value} ({default_text(knob).split(' ', 1)[1].strip('()')})"
        lines.append(f"{knob.env:<{width}}  {text:<30}  {source}")
    lines.append("")
    lines.append(f"access: {access.describe()}")
    lines.append(f"store: {settings.store_kind}")
    lines.append(f"listening on: {settings.host}:{settings.port}")
    return "\n".join(lines)


def check_config(argv: Sequence[str], environ: dict[str, str] | None = None) -> int:
    env = dict(os.environ if environ is None else environ)
    try:
        settings = Settings.load(argv, env)
        warnings: list[str] = []
        for check in CHECKS:
            warnings += check(settings)
        access = access_from_settings(settings)
    except SettingsError as exc:
        print(f"hive-relay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"hive-relay: {exc.filename!r}: {exc.strerror}", file=sys.stderr)
        return 2
    print(render(settings, access, _sources(argv, env)))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    return 0
