"""Start a real `python -m relay` process on a free loopback port, for tests.

    with RelayProcess(env={"HIVE_RELAY_ACCESS_TOKENS": "t"}) as relay:
        httpx.get(relay.url + "/v1/health")

The process's output goes to `relay.log_path`; `relay.logs()` reads it.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment without HIVE_RELAY_*/PORT settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_RELAY_") and k != "PORT"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class RelayProcess:
    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        port: int | None = None,
        wait: bool = True,
        startup_timeout: float = 20.0,
        preexec_fn: Callable[[], None] | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.wait = wait
        self.startup_timeout = startup_timeout
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. setrlimit)
        # With direct TLS (HIVE_RELAY_TLS_CERT): the client context that trusts its CA.
        self.verify = verify
        self.proc: subprocess.Popen[bytes] | None = None
        self._logdir = tempfile.mkdtemp(prefix="relay-log-")
        self.log_path = Path(self._logdir) / "relay.log"

    @property
    def url(self) -> str:
        scheme = "http" if self.verify is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> RelayProcess:
        env = relay_env({"HIVE_RELAY_ADDR": f"127.0.0.1:{self.port}", **self.extra_env})
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", *self.args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,  # noqa: PLW1509 - only setrlimit-style calls
        )
        if self.wait:
            self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                answer = httpx.get(self.url + "/v1/health", timeout=1.0, verify=self.verify or True)
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"relay did not become healthy:\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        elif self.proc is not None:
            self._log.close()


# What a healthy relay never logs, whatever its clients do (hang up, reset, stall):
# uvicorn's line for an exception that escaped the app, any traceback, any error.
LOG_NOISE = ("Traceback", "Exception in ASGI application", " ERROR ", " CRITICAL ")


def assert_quiet_log(log: str) -> None:
    """Fail, quoting the lines around it, if a text-format relay log holds LOG_NOISE."""
    for word in LOG_NOISE:
        at = log.find(word)
        assert at < 0, log[max(0, at - 300) :][:6000]
