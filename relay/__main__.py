"""`python -m relay`: flags + environment → Settings → uvicorn.

`python -m relay token keygen`, `… token issue` and `… token revoke` are the
operator's tools for signed access tokens; `python -m relay check-config`
validates the configuration as start-up would (relay/checkconfig.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from relay.settings import Settings, SettingsError

if TYPE_CHECKING:
    import uvicorn

LOG = logging.getLogger("relay")


def _token_main(argv: Sequence[str]) -> int:
    from relay.access import generate_keypair, issue_token, new_token_id, parse_key_bytes

    parser = argparse.ArgumentParser(
        prog="python -m relay token", description="Manage signed hrt1 access tokens."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("keygen", help="print a new Ed25519 signing key pair")
    issue = sub.add_parser("issue", help="print a signed token")
    issue.add_argument(
        "--key",
        required=True,
        help="the private signing key: 64 hex characters, base64, or @FILE holding either",
    )
    issue.add_argument("--sub", required=True, help="subject: who the token is for")
    issue.add_argument(
        "--exp-days", type=float, default=0, help="days until the token expires (default 0 = never)"
    )
    issue.add_argument(
        "--ws",
        action="append",
        default=[],
        metavar="WORKSPACE",
        help="grant only this workspace id, or a prefix ending in * (repeatable)",
    )
    issue.add_argument("--plan", default=None, help="optional plan claim")
    revoke = sub.add_parser(
        "revoke",
        help="revoke a signed token by its id (jti) or every token of a subject (sub:NAME)",
        description="Append an entry to the revocation file; a running relay reads it "
        "within HIVE_RELAY_RELOAD_INTERVAL seconds (or on SIGHUP) and ends the streams "
        "of the tokens it revokes.",
    )
    revoke.add_argument("entry", metavar="JTI|sub:NAME", help="the token id `token issue` printed")
    revoke.add_argument(
        "--file",
        default=None,
        help="the revocation file (default: $HIVE_RELAY_REVOKED_TOKENS_FILE)",
    )
    revoke.add_argument("--note", default="", help="a comment kept on the same line")
    args = parser.parse_args(list(argv))
    if args.cmd == "revoke":
        return _revoke(args.entry, args.file, args.note)
    if args.cmd == "keygen":
        private, public = generate_keypair()
        print(f"private key (keep secret; used by `token issue --key`): {private}")
        print(f"public key (set on the relay):  HIVE_RELAY_TOKEN_PUBKEY={public}")
        return 0
    key_text: str = args.key
    if key_text.startswith("@"):
        try:
            key_text = Path(key_text[1:]).read_text().strip()
        except OSError as exc:
            print(f"--key: cannot read {key_text[1:]!r}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        private_key = parse_key_bytes(key_text, "--key")
    except SettingsError as exc:
        print(str(exc).replace("Ed25519 key", "Ed25519 private key"), file=sys.stderr)
        return 2
    if args.exp_days < 0:
        print("--exp-days: must not be negative", file=sys.stderr)
        return 2
    exp = int(time.time() + args.exp_days * 86400) if args.exp_days else 0
    extra = {"plan": args.plan} if args.plan else None
    jti = new_token_id()
    # The token alone on stdout, so `TOKEN=$(python -m relay token issue …)` keeps working.
    print(issue_token(private_key, args.sub, exp, args.ws or None, extra, jti=jti))
    print(f"token id (jti, for `token revoke`): {jti}", file=sys.stderr)
    return 0


def _revoke(entry: str, path: str | None, note: str) -> int:
    """Append one line to the revocation file, atomically (docs/operations.md says why so).

    One O_APPEND write of the whole line: it lands at the end of the file in one
    piece, concurrent `revoke`s cannot overwrite each other (as write-a-copy-and-
    rename could), and the file keeps its inode, so a bind mount or hard link sees it.
    An flock serialises revokes with each other for the trailing-newline check.
    """
    import fcntl

    from relay.access import revocation_entry_error

    entry = entry.strip()
    problem = revocation_entry_error(entry)
    if problem is not None:
        print(f"token revoke: {entry!r}: {problem}", file=sys.stderr)
        return 2
    path = path or os.environ.get("HIVE_RELAY_REVOKED_TOKENS_FILE", "").strip()
    if not path:
        print(
            "token revoke: no revocation file: pass --file or set HIVE_RELAY_REVOKED_TOKENS_FILE",
            file=sys.stderr,
        )
        return 2
    if "\n" in note or "\r" in note:
        print("token revoke: --note must be one line", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = f"{entry}  # revoked {stamp}{' ' + note if note else ''}\n".encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        print(f"token revoke: cannot open {path!r}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a hand-edited file without a last newline
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        print(f"token revoke: cannot write {path!r}: {exc.strerror}", file=sys.stderr)
        return 2
    finally:
        os.close(fd)
    print(f"revoked {entry} in {path}", file=sys.stderr)
    return 0


def _raise_fd_limit() -> None:
    """Every live stream is a descriptor: use the hard limit, not the (often 1024) soft one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-POSIX or locked down
        pass


def _http_protocol(settings: Settings) -> type:
    """uvicorn's httptools protocol with the relay's head limit, stall timeout, linger bound."""
    from relay.server import RelayHttpProtocol

    limits = {
        "head_limit": settings.header_limit,
        "head_timeout": max(1.0, settings.keepalive_timeout),
        # A client that sent a body well past the limit still gets its 413.
        "linger_limit": max(4 * settings.max_body_bytes, 1 << 20),
    }
    return type("RelayHttp", (RelayHttpProtocol,), limits)


def _ws_protocol() -> type:
    from relay.server import RelayWebSocketProtocol

    return RelayWebSocketProtocol


def _exit_0_after_a_graceful_stop(server: uvicorn.Server) -> None:
    """Install the SIGINT/SIGTERM handlers uvicorn hands a signal back to.

    uvicorn, once it has shut down for a signal, restores the handlers that were in
    place before it ran and raises the signal again, so that the default action ends
    the process (SIGTERM: killed by the signal; SIGINT: KeyboardInterrupt). A
    graceful stop is a clean exit (0) for the relay's supervisors, so these
    handlers ignore the signal once a stop is under way. A signal that arrives
    before uvicorn's own handlers are in place starts the same stop.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # uvicorn installs no handlers either

    def handler(sig: int, frame: FrameType | None) -> None:
        if not server.should_exit:
            server.handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _serve(settings: Settings, sock: socket.socket | None = None) -> int:
    import uvicorn

    from relay import __version__, logs
    from relay.access import ignored_settings
    from relay.app import create_app

    logs.configure(settings.log_format, settings.log_level)
    _raise_fd_limit()
    if threading.current_thread() is threading.main_thread():
        # SIGHUP means "reload" (the lifespan installs that); until then it must not
        # end the process, as its default action would. Files are read just below.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = create_app(settings)
    relay = app.state.relay
    for name, why in ignored_settings(settings):
        LOG.warning("%s is ignored: %s", name, why)
    if settings.data_dir and settings.store_kind != "memory":
        LOG.warning("HIVE_RELAY_DATA_DIR is ignored: snapshots apply to the memory store only")
    if settings.hsts and relay.tls is None:
        LOG.warning(
            "HIVE_RELAY_HSTS is ignored: it is sent only when the relay serves TLS itself "
            "(HIVE_RELAY_TLS_CERT); behind a TLS proxy, let the proxy send it"
        )
    tls = relay.tls

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=_http_protocol(settings),
        ws=_ws_protocol(),
        lifespan="on",
        backlog=settings.backlog,
        timeout_keep_alive=int(max(1, settings.keepalive_timeout)),
        timeout_graceful_shutdown=int(max(1, settings.shutdown_timeout)),
        h11_max_incomplete_event_size=settings.header_limit,
        ws_max_size=settings.max_body_bytes + 64 * 1024,
        # Ciphertext does not compress, and compressing secrets next to data an
        # attacker chooses is how CRIME/BREACH-style leaks start: no deflate.
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        # Direct TLS: the reloader's context, whose handshakes pick up a renewed
        # certificate (relay/tls.py). uvicorn then reports https/wss in the scope.
        ssl_context_factory=None if tls is None else (lambda config, default: tls.context),
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # First end every live stream, so that connections can close within the
            # shutdown timeout; then uvicorn's own handling (stop, or force on a
            # second Ctrl-C).
            if not self.should_exit:
                LOG.info("signal %s: shutting down", signal.Signals(sig).name)
                try:
                    asyncio.get_running_loop().call_soon_threadsafe(relay.close_streams)
                except RuntimeError:
                    relay.close_streams()
            super().handle_exit(sig, frame)

    server = Server(config)
    _exit_0_after_a_graceful_stop(server)
    LOG.info(
        "hive-relay %s listening on %s:%d (%s; store %s, access %s, pid %d, %d worker%s)",
        __version__,
        settings.host,
        settings.port,
        "plain HTTP" if tls is None else f"HTTPS, certificate {tls.certificate.describe()}",
        settings.store.split("://", 1)[0],
        relay.policy.name,
        os.getpid(),
        settings.workers,
        "" if settings.workers == 1 else "s",
    )
    server.run(sockets=[sock] if sock is not None else None)
    if not server.started:
        LOG.error("the relay did not start (see above)")
        return 1
    return 0


def _fork_worker(settings: Settings, sock: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:  # the worker: default signal handling until uvicorn installs its own
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its lifespan installs "reload"
        code = 1
        try:
            code = _serve(settings, sock)
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def _supervise(settings: Settings) -> int:
    """HIVE_RELAY_WORKERS > 1: one listening socket, inherited by N forked relays.

    SIGTERM/SIGINT to this process is passed to every worker (each closes its
    streams as a single relay does) and, once all have exited, this process
    exits 0. SIGHUP is passed on too: each worker reloads its access files. A
    worker that dies otherwise is logged and replaced.
    """
    from relay import logs

    logs.configure(settings.log_format, settings.log_level)
    _raise_fd_limit()
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        sock = socket.create_server(
            (settings.host, settings.port), family=family, backlog=settings.backlog
        )
    except OSError as exc:
        LOG.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror)
        return 1
    sock.set_inheritable(True)
    LOG.info("supervisor pid %d starting %d workers", os.getpid(), settings.workers)
    stopping: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if not stopping:
            LOG.info("signal %s: stopping %d workers", signal.Signals(sig).name, len(workers))
        stopping.append(sig)
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if len(stopping) == 1 else signal.SIGINT)

    def on_sighup(sig: int, frame: FrameType | None) -> None:
        LOG.info("signal SIGHUP: asking %d workers to reload", len(workers))
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    workers: dict[int, float] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, on_sighup)
    for _ in range(settings.workers):
        workers[_fork_worker(settings, sock)] = time.monotonic()
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        started = workers.pop(pid, None)
        if started is None:
            continue
        if stopping:
            continue
        LOG.warning(
            "worker pid %d exited (%s); starting a new one",
            pid,
            f"signal {-os.waitstatus_to_exitcode(status)}"
            if os.WIFSIGNALED(status)
            else f"code {os.waitstatus_to_exitcode(status)}",
        )
        if time.monotonic() - started < 1.0:
            time.sleep(1.0)  # a worker that dies at once must not spin the supervisor
        if not stopping:
            workers[_fork_worker(settings, sock)] = time.monotonic()
    sock.close()
    LOG.info("all workers stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["token"]:
        return _token_main(args[1:])
    if args[:1] == ["check-config"]:
        from relay.checkconfig import check_config

        return check_config(args[1:])
    try:
        settings = Settings.load(args)
        if settings.workers > 1:
            if settings.tls_cert:  # refuse here, once, rather than in every worker
                from relay.app import open_tls

                open_tls(settings)
            return _supervise(settings)
        return _serve(settings)
    except SettingsError as exc:
        print(f"hive-relay: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
