"""Helpers of the end-to-end tests: real Caddy, real Chromium, a cuttable TCP hop.

Every process started here runs in its own session and is ended (group-wide)
when its context exits; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.relayproc import free_port
from tests.relayproc import relay_env as clean_env

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ARTIFACTS = REPO / "test-artifacts"

# The flags that work on these machines (and in CI): no sandbox as root, no GPU,
# and none of Chromium's own network chatter, which the closed network refuses.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Proc:
    """A subprocess in its own session, output to a log file, ended group-wide."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
        user: int | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="e2e-log-")) / "out.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=user,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Anything the process left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def access_clients(log_text: str) -> list[tuple[str, str, str]]:
    """(method, route, client) of every request line in a relay's text log."""
    out = []
    for line in log_text.splitlines():
        if " relay.access " not in line:
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        out.append((fields.get("method", ""), fields.get("route", ""), fields.get("client", "")))
    return out


# --------------------------------------------------------------------- Caddy
def caddyfile_for_test(https_port: int, http_port: int, upstream: str) -> str:
    """deploy/Caddyfile as shipped, with only what a loopback test must change:
    the site address (127.0.0.1 and a free port, `tls internal`, bound to
    loopback), the relay's address, and global options that keep Caddy off the
    admin port and out of the system trust store."""
    text = (DEPLOY / "Caddyfile").read_text()
    replacements = [
        (
            "\n{\n",
            "\n{\n"
            "\tadmin off\n"
            "\tskip_install_trust\n"
            "\tauto_https disable_redirects\n"
            f"\thttp_port {http_port}\n"
            f"\thttps_port {https_port}\n",
        ),
        (
            "\nrelay.example.com {\n",
            f"\nhttps://127.0.0.1:{https_port} {{\n\tbind 127.0.0.1\n\ttls internal\n",
        ),
        ("reverse_proxy 127.0.0.1:8443 {", f"reverse_proxy {upstream} {{"),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"deploy/Caddyfile no longer has exactly one {old!r}"
        text = text.replace(old, new)
    return text


class Caddy:
    """`caddy run` with the project's Caddyfile, adapted to loopback, in a temp dir."""

    def __init__(self, caddy: str, upstream: str, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "Caddyfile"
        self.config.write_text(caddyfile_for_test(self.port, free_port(), upstream))
        env = clean_env(
            {
                "HOME": str(self.dir),
                "XDG_DATA_HOME": str(self.dir / "data"),
                "XDG_CONFIG_HOME": str(self.dir / "config"),
            }
        )
        self.proc = Proc(
            [caddy, "run", "--config", str(self.config), "--adapter", "caddyfile"],
            env=env,
            cwd=self.dir,
            log_path=self.dir / "caddy.log",
        )
        self.url = f"https://127.0.0.1:{self.port}"
        self.root_cert = self.dir / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
        try:
            wait_for(self._ready, 20, "Caddy to serve HTTPS with its local CA")
        except AssertionError:
            self.proc.stop()
            raise AssertionError(f"Caddy did not start:\n{self.proc.logs()}") from None

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"caddy exited:\n{self.proc.logs()}")
        if not self.root_cert.exists():
            return False
        try:
            with self.client() as c:
                return c.get("/v1/health", timeout=2).status_code == 200
        except (httpx.HTTPError, ssl.SSLError, OSError):
            return False

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies certificates against Caddy's local CA only (and the host name)."""
        return ssl.create_default_context(cafile=str(self.root_cert))

    def client(self, local_address: str | None = None, **kw: Any) -> httpx.Client:
        transport = httpx.HTTPTransport(verify=self.ssl_context(), local_address=local_address)
        return httpx.Client(base_url=self.url, transport=transport, timeout=10, **kw)

    def async_client(self, local_address: str | None = None, **kw: Any) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(verify=self.ssl_context(), local_address=local_address)
        return httpx.AsyncClient(base_url=self.url, transport=transport, timeout=10, **kw)

    def stop(self) -> None:
        # Caddy 2.6 notices a client that left an SSE stream only at its next write
        # (the relay's next keep-alive), and a graceful stop waits for that. Nothing
        # here needs a graceful stop: give it a second, then end it.
        self.proc.stop(timeout=1)


# ------------------------------------------------------------- a cuttable hop
class CuttableForwarder:
    """A loopback TCP forwarder the test can cut, and hold new connections at.

    `cut()` closes every open connection (the browser sees the stream drop);
    while `hold()` is on, new connections are accepted but not forwarded until
    `release()`. The first bytes each client sent (its request head) are kept in
    `heads`, so a test can read what the browser asked for on reconnect.
    """

    def __init__(self, upstream_port: int, timeout: float = 30.0) -> None:
        self.upstream_port = upstream_port
        self.timeout = timeout
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []
        self.held = 0
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.add(conn)
        if not self._released.is_set():
            with self._lock:
                self.held += 1
            self._released.wait(self.timeout)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            self._close(conn)
            return
        with self._lock:
            self._open.add(upstream)
            index = len(self.heads)
            self.heads.append(b"")

        def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if record and len(self.heads[index]) < 8192:
                        self.heads[index] += data
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                self._close(src)
                self._close(dst)

        threading.Thread(target=pump, args=(upstream, conn, False), daemon=True).start()
        pump(conn, upstream, True)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._open.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def cut(self) -> None:
        with self._lock:
            sockets = list(self._open)
        for s in sockets:
            self._close(s)

    def close(self) -> None:
        self._closing = True
        self._released.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()


@contextlib.contextmanager
def chromium(
    binary: str,
    url: str,
    profile: Path,
    extra: Sequence[str] = (),
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Proc]:
    """A headless Chromium showing `url` until the block ends (`env`: e.g. a HOME
    whose NSS database trusts a test CA)."""
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
    proc = Proc(cmd, env=clean_env(env), log_path=log)
    try:
        yield proc
    finally:
        proc.stop(timeout=5)


def run_chromium(
    binary: str,
    args: Sequence[str],
    profile: Path,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> str:
    """One Chromium run that ends by itself (--dump-dom, --screenshot); its stdout."""
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(
        cmd,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {timeout} s: {cmd}") from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}:\n{err.decode(errors='replace')}")
    return out.decode(errors="replace")


# ------------------------------------------------------- DevTools protocol
class DevTools:
    """A headless Chromium driven over the DevTools protocol (one page target).

    Chromium picks its own debugging port (`--remote-debugging-port=0`) and writes
    it to DevToolsActivePort in the profile; the page's WebSocket is found through
    /json/list. `call` sends one command and returns its result; the events that
    arrive meanwhile are kept in `events` (console messages, log entries).
    """

    def __init__(self, binary: str, profile: Path, extra: Sequence[str] = ()) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        cmd = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            *extra,
            "about:blank",
        ]
        self.proc = Proc(cmd, env=clean_env(), log_path=profile.parent / "chromium.log")
        try:
            active = profile / "DevToolsActivePort"
            wait_for(lambda: active.exists() and active.read_text().strip(), 30, "DevTools port")
            port = int(active.read_text().split()[0])
            pages = wait_for(
                lambda: [
                    t
                    for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                    if t.get("type") == "page"
                ],
                15,
                "a page target",
            )
            self._stack = contextlib.ExitStack()
            self.ws = self._stack.enter_context(
                connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
            )
        except BaseException:
            self.proc.stop(timeout=5)
            raise
        self.events: list[dict[str, Any]] = []
        self._next = 0

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        import json

        self._next += 1
        ident = self._next
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"DevTools {method} did not answer within {timeout} s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"DevTools {method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        self.proc.stop(timeout=5)

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
