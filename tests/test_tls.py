"""Direct TLS (HIVE_RELAY_TLS_CERT/KEY): real relays, certificates from a test CA.

HTTPS and WSS on one port; a certificate renewed on disk reaches the next
connection while an open stream goes on; a bad replacement keeps the old one;
TLS 1.1 is refused; HSTS only when asked; start-up refuses an unusable pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.certs import Leaf, TestCA
from tests.redisproc import RedisServer, own_server_required
from tests.relayproc import REPO, RelayProcess, assert_quiet_log, relay_env


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


class Pair:
    """The two files a relay is pointed at, and what was last written to them."""

    def __init__(self, ca: TestCA, directory: Path) -> None:
        self.ca = ca
        self.cert = directory / "fullchain.pem"
        self.key = directory / "privkey.pem"
        self.leaf = ca.issue("relay-1")
        self.leaf.write(self.cert, self.key)

    def renew(self, cn: str) -> Leaf:
        self.leaf = self.ca.issue(cn)
        self.leaf.write(self.cert, self.key)
        return self.leaf

    @property
    def env(self) -> dict[str, str]:
        return {"HIVE_RELAY_TLS_CERT": str(self.cert), "HIVE_RELAY_TLS_KEY": str(self.key)}


@pytest.fixture
def pair(ca: TestCA, tmp_path: Path) -> Pair:
    return Pair(ca, tmp_path)


@pytest.fixture
def relay(pair: Pair) -> Iterator[RelayProcess]:
    with RelayProcess(env=pair.env, verify=pair.ca.client_context()) as proc:
        yield proc


def served_serial(port: int, ca: TestCA) -> int:
    """The serial number of the certificate a new connection is handed (verified)."""
    context = ca.client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def metric(relay: RelayProcess, name: str) -> float:
    text = httpx.get(relay.url + "/metrics", verify=relay.verify or True, timeout=5).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------ serving


def test_https_and_wss_on_one_port(relay: RelayProcess, ca: TestCA) -> None:
    verify = ca.client_context()
    with httpx.Client(base_url=relay.url, verify=verify, timeout=10) as c:
        health = c.get("/v1/health")
        assert health.status_code == 200
        assert "strict-transport-security" not in health.headers  # not asked for
        r = c.post("/v1/workspaces/tls-a/envelopes", json={"n": 1})
        assert r.status_code == 200, r.text
        seq = r.json()["seq"]

        async def over_wss() -> dict[str, object]:
            url = f"wss://127.0.0.1:{relay.port}/v1/workspaces/tls-a/ws"
            async with websockets.connect(url, ssl=verify) as sock:
                await sock.send(json.dumps({"op": "sub", "after": 0}))
                while True:
                    frame = json.loads(await asyncio.wait_for(sock.recv(), 10))
                    if frame["op"] == "env":
                        return frame

        frame = asyncio.run(over_wss())
        assert frame["seq"] == seq and frame["body"] == {"n": 1}
        page = c.get("/").text
        assert "<th>Transport</th><td>TLS (served by the relay): relay-1, expires " in page
    # The TLS port speaks only TLS: plain HTTP on it gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{relay.port}/v1/health", timeout=5)
    # An untrusted client (the system CAs only) refuses the test certificate.
    with pytest.raises(httpx.ConnectError):
        httpx.get(relay.url + "/v1/health", timeout=5)
    log = relay.logs()
    assert f"listening on 127.0.0.1:{relay.port} (HTTPS, certificate relay-1, expires " in log
    assert "Uvicorn running on https://" in log
    assert metric(relay, "hive_relay_tls_cert_not_after_seconds") == pytest.approx(
        ca_leaf_not_after(relay), abs=1
    )


def ca_leaf_not_after(relay: RelayProcess) -> float:
    from cryptography import x509

    key_env = relay.extra_env["HIVE_RELAY_TLS_CERT"]
    cert = x509.load_pem_x509_certificate(Path(key_env).read_bytes())
    return cert.not_valid_after_utc.timestamp()


def test_plain_relay_says_plain_http() -> None:
    with RelayProcess(env={"HIVE_RELAY_HSTS": "600"}) as relay:
        r = httpx.get(relay.url + "/v1/health", timeout=5)
        assert "strict-transport-security" not in r.headers  # never over plain HTTP
        page = httpx.get(relay.url + "/", timeout=5).text
        assert "<th>Transport</th><td>plain HTTP" in page
        log = relay.logs()
    assert f"listening on 127.0.0.1:{relay.port} (plain HTTP; " in log
    assert "HIVE_RELAY_HSTS is ignored" in log


def test_hsts_when_asked(pair: Pair) -> None:
    env = {**pair.env, "HIVE_RELAY_HSTS": "31536000"}
    with RelayProcess(env=env, verify=pair.ca.client_context()) as relay:
        with httpx.Client(base_url=relay.url, verify=relay.verify or True, timeout=5) as c:
            for answer in (
                c.get("/v1/health"),
                c.get("/"),
                c.post("/v1/workspaces/h/envelopes", json={}),  # the hot lane
                c.get("/v1/workspaces/h/envelopes"),
                c.get("/v1/workspaces/h/envelopes"),  # the same page, from the page cache
                c.get("/no/such/route"),  # an error answer too
            ):
                assert answer.headers["strict-transport-security"] == "max-age=31536000"
            assert "HIVE_RELAY_HSTS is ignored" not in relay.logs()


def _old_protocol_client(ca: TestCA, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers protocols down to TLS 1.0, at most `version`."""
    context = ca.client_context()
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = version
    return context


def _handshake(port: int, context: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return str(tls.version())


def _tls_1_1_server(pair: Pair) -> tuple[int, threading.Thread]:
    """A server that still allows TLS 1.1: proof that the client really offers it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.load_cert_chain(pair.cert, pair.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_tls_1_1_refused_1_2_and_1_3_accepted(relay: RelayProcess, pair: Pair, ca: TestCA) -> None:
    old = _old_protocol_client(ca, ssl.TLSVersion.TLSv1_1)
    port, thread = _tls_1_1_server(pair)
    assert _handshake(port, old) == "TLSv1.1"  # the client can speak it
    thread.join(5)
    with pytest.raises(ssl.SSLError) as refused:  # an alert, or the relay hangs up
        _handshake(relay.port, old)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)
    assert _handshake(relay.port, _old_protocol_client(ca, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    assert _handshake(relay.port, ca.client_context()) == "TLSv1.3"
    health = httpx.get(relay.url + "/v1/health", verify=relay.verify or True, timeout=5)
    assert health.status_code == 200


# ------------------------------------------------------------ renewal


def test_renewed_certificate_reaches_next_connection_while_stream_continues(
    relay: RelayProcess, pair: Pair, ca: TestCA
) -> None:
    first = pair.leaf.serial
    assert served_serial(relay.port, ca) == first

    async def scenario() -> None:
        verify = ca.client_context()
        wss = f"wss://127.0.0.1:{relay.port}/v1/workspaces/renew/ws"
        async with (
            httpx.AsyncClient(base_url=relay.url, verify=verify, timeout=30) as sub,
            sub.stream("GET", "/v1/workspaces/renew/events", params={"bodies": "1"}) as stream,
            websockets.connect(wss, ssl=verify) as sock,
        ):
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith(": connected")
            await sock.send(json.dumps({"op": "sub", "after": 0}))
            renewed = pair.renew("relay-2")
            await asyncio.to_thread(
                wait_until,
                lambda: served_serial(relay.port, ca) == renewed.serial,
                "the renewed certificate on a new connection",
            )
            # The stream opened under the old certificate still delivers.
            async with httpx.AsyncClient(base_url=relay.url, verify=verify, timeout=10) as pub:
                r = await pub.post("/v1/workspaces/renew/envelopes", json={"after": "renewal"})
                assert r.status_code == 200, r.text
            async for line in lines:
                if line.startswith("data:"):
                    assert json.loads(line[5:])["body"] == {"after": "renewal"}
                    break
            while True:  # and so does the WebSocket
                frame = json.loads(await asyncio.wait_for(sock.recv(), 10))
                if frame["op"] == "env":
                    assert frame["body"] == {"after": "renewal"}
                    break

    asyncio.run(scenario())
    assert metric(relay, 'hive_relay_tls_reload_total{result="ok"}') == 1
    assert metric(relay, 'hive_relay_tls_reload_total{result="failed"}') == 0
    page = httpx.get(relay.url + "/", verify=relay.verify or True, timeout=5).text
    assert "relay-2, expires" in page
    log = relay.logs()
    assert "TLS certificate reloaded: relay-2, expires " in log
    assert_quiet_log(log)


def _garbage(pair: Pair) -> str:
    pair.cert.write_bytes(b"this is not a certificate\n")
    return f"certificate {pair.cert}: not a PEM certificate"


def _half_written(pair: Pair) -> str:
    fresh = pair.ca.issue("half")
    pair.cert.write_bytes(fresh.cert_pem[: len(fresh.cert_pem) // 2])  # in place, cut short
    return f"certificate {pair.cert}: not a PEM certificate"


def _key_mismatch(pair: Pair) -> str:
    fresh = pair.ca.issue("other-key")
    tmp = pair.cert.with_name("new.pem")
    tmp.write_bytes(fresh.cert_pem)  # a new certificate, the old key left in place
    tmp.rename(pair.cert)
    return f"key {pair.key}: does not match the certificate {pair.cert}"


def _expired(pair: Pair) -> str:
    pair.ca.issue("stale", expired=True).write(pair.cert, pair.key)
    return f"certificate {pair.cert}: expired on "


def _key_gone(pair: Pair) -> str:
    pair.key.unlink()
    return f"key {pair.key}: cannot read: No such file or directory"


def test_sighup_reloads_the_certificate_when_polling_is_off(pair: Pair, ca: TestCA) -> None:
    """With HIVE_RELAY_RELOAD_INTERVAL=0 only SIGHUP makes the relay look at the
    files: a renewal is not served until the signal, and is served right after it."""
    env = {**pair.env, "HIVE_RELAY_RELOAD_INTERVAL": "0"}
    with RelayProcess(env=env, verify=ca.client_context()) as proc:
        first = pair.leaf.serial
        renewed = pair.renew("relay-hup")
        time.sleep(3)  # longer than the default poll: nothing may pick the files up
        assert served_serial(proc.port, ca) == first
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: served_serial(proc.port, ca) == renewed.serial,
            "the renewed certificate after SIGHUP",
        )
        assert proc.proc.poll() is None  # SIGHUP reloads; it does not stop the relay


@pytest.mark.parametrize(
    "spoil",
    [
        _garbage,
        _half_written,
        _key_mismatch,
        # The same path as the others past the load; tests/test_tls_reloader.py too.
        pytest.param(_expired, marks=pytest.mark.slow),
        pytest.param(_key_gone, marks=pytest.mark.slow),
    ],
    ids=lambda f: f.__name__,
)
def test_bad_replacement_keeps_the_old_certificate(
    relay: RelayProcess, pair: Pair, ca: TestCA, spoil: Callable[[Pair], str]
) -> None:
    served = pair.leaf.serial
    reason = spoil(pair)
    wait_until(
        lambda: metric(relay, 'hive_relay_tls_reload_total{result="failed"}') == 1,
        "the failed reload on /metrics",
    )
    assert served_serial(relay.port, ca) == served
    health = httpx.get(relay.url + "/v1/health", verify=relay.verify or True, timeout=5)
    assert health.status_code == 200
    time.sleep(2.5)  # another check or more: a failure is reported once, not every poll
    failures = [line for line in relay.logs().splitlines() if "TLS reload failed" in line]
    assert len(failures) == 1, failures
    assert f"still serving relay-1: {reason}" in failures[0]
    assert metric(relay, 'hive_relay_tls_reload_total{result="failed"}') == 1
    # A good pair afterwards is taken.
    renewed = pair.renew("relay-3")
    wait_until(lambda: served_serial(relay.port, ca) == renewed.serial, "the good pair")
    assert metric(relay, 'hive_relay_tls_reload_total{result="ok"}') == 1


# ------------------------------------------------------------ start-up


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay"],
        cwd=REPO,
        env=relay_env({"HIVE_RELAY_ADDR": "127.0.0.1:0", **env}),
        capture_output=True,
        check=False,
        timeout=60,
    )


def test_start_up_refuses_an_unusable_pair(pair: Pair, ca: TestCA, tmp_path: Path) -> None:
    only_cert = _start({"HIVE_RELAY_TLS_CERT": str(pair.cert)})
    assert only_cert.returncode == 2
    assert b"HIVE_RELAY_TLS_KEY: must be set with HIVE_RELAY_TLS_CERT" in only_cert.stderr
    only_key = _start({"HIVE_RELAY_TLS_KEY": str(pair.key)})
    assert only_key.returncode == 2
    assert b"HIVE_RELAY_TLS_CERT: must be set with HIVE_RELAY_TLS_KEY" in only_key.stderr

    other = ca.issue("other")
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(other.key_pem)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"garbage")
    for env, message in (
        ({**pair.env, "HIVE_RELAY_TLS_KEY": str(other_key)}, "HIVE_RELAY_TLS_KEY: key "),
        ({**pair.env, "HIVE_RELAY_TLS_CERT": str(garbage)}, "HIVE_RELAY_TLS_CERT: certificate "),
        (
            {**pair.env, "HIVE_RELAY_TLS_CERT": str(tmp_path / "missing.pem")},
            "HIVE_RELAY_TLS_CERT: certificate ",
        ),
    ):
        proc = _start(env)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.decode().strip()
        assert line.startswith("hive-relay: " + message), line
        assert "Traceback" not in line


# ------------------------------------------------------------ workers


@pytest.mark.slow
def test_two_workers_serve_tls_and_both_take_a_renewal(pair: Pair, ca: TestCA) -> None:
    own_server_required()
    with RedisServer() as server:
        env = {**pair.env, "HIVE_RELAY_STORE": server.url, "HIVE_RELAY_WORKERS": "2"}
        with RelayProcess(env=env, verify=ca.client_context()) as relay:
            pids = set()
            deadline = time.monotonic() + 30
            while len(pids) < 2 and time.monotonic() < deadline:
                text = httpx.get(relay.url + "/metrics", verify=relay.verify or True).text
                m = re.search(r"^hive_relay_worker_pid (\S+)$", text, re.M)
                assert m
                pids.add(int(float(m.group(1))))
            assert len(pids) == 2
            renewed = pair.renew("relay-workers")
            wait_until(
                lambda: served_serial(relay.port, ca) == renewed.serial, "the renewed certificate"
            )
            # Each worker loads the renewal itself: every new connection, whichever
            # worker takes it, gets the new certificate once both have polled.
            time.sleep(2.5)
            assert {served_serial(relay.port, ca) for _ in range(20)} == {renewed.serial}
            assert relay.stop() == 0
