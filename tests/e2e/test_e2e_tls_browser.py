"""A real browser over direct TLS: headless Chromium trusting a test CA.

The CA goes into an NSS database (certutil, from libnss3-tools) in a private
HOME, which is where Chromium on Linux looks for trusted roots; no flag turns
certificate checks off. Chromium loads the relay's status page over HTTPS, and
a page from another origin opens an EventSource on the relay's HTTPS port and
receives a pushed envelope. A Chromium without the CA refuses the same page.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from e2e_helpers import ARTIFACTS, chromium, run_chromium, wait_for
from test_e2e_browser import PAGE, PageServer

from tests.certs import TestCA
from tests.conftest import require_tool
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _home_trusting(ca: TestCA, home: Path, certutil: str) -> dict[str, str]:
    """A HOME whose NSS database trusts `ca` for TLS servers; the env that selects it."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    ca_file = ca.write_ca(home / "ca.pem")
    db = f"sql:{nssdb}"
    subprocess.run([certutil, "-N", "-d", db, "--empty-password"], check=True, timeout=30)
    subprocess.run(
        [certutil, "-A", "-d", db, "-n", "hive-relay test CA", "-t", "C,,", "-i", str(ca_file)],
        check=True,
        timeout=30,
    )
    listed = subprocess.run(
        [certutil, "-L", "-d", db], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    assert "hive-relay test CA" in listed
    return {"HOME": str(home)}


def test_status_page_and_eventsource_over_https(tmp_path: Path) -> None:
    chromium_bin = require_tool("chromium")
    certutil = require_tool("certutil")
    ca = TestCA()
    leaf = ca.issue("relay.test")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    leaf.write(cert, key)
    trusted = _home_trusting(ca, tmp_path / "home", certutil)
    untrusted_home = tmp_path / "plain-home"
    untrusted_home.mkdir()

    pages = PageServer()
    env = {
        "HIVE_RELAY_TLS_CERT": str(cert),
        "HIVE_RELAY_TLS_KEY": str(key),
        "HIVE_RELAY_CORS_ORIGINS": pages.origin,
        "HIVE_RELAY_HSTS": "600",
    }
    relay = RelayProcess(env=env, verify=ca.client_context())
    try:
        relay.start()
        verify = ca.client_context()
        r = httpx.post(f"{relay.url}/v1/workspaces/tls-e2e/envelopes", json={"n": 0}, verify=verify)
        assert r.status_code == 200, r.text

        # The status page, over HTTPS, in a browser that trusts the test CA.
        dom = run_chromium(
            chromium_bin,
            ["--dump-dom", relay.url + "/"],
            tmp_path / "profile-dom",
            env=trusted,
        )
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "status-page-tls.html").write_text(dom)
        assert "<h1>hive-relay</h1>" in dom
        rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", dom))
        assert rows["Transport"].startswith("TLS (served by the relay): relay.test, expires ")
        assert rows["Envelopes retained"] == "1"
        shot = ARTIFACTS / "status-page-tls.png"
        shot.unlink(missing_ok=True)
        run_chromium(
            chromium_bin,
            ["--window-size=1024,768", f"--screenshot={shot}", relay.url + "/"],
            tmp_path / "profile-shot",
            env=trusted,
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # The same page in a browser that does not trust the CA: an error page, no relay.
        refused = run_chromium(
            chromium_bin,
            ["--dump-dom", relay.url + "/"],
            tmp_path / "profile-untrusted",
            env={"HOME": str(untrusted_home)},
        )
        assert "<h1>hive-relay</h1>" not in refused

        # An EventSource on the relay's HTTPS port, from a page of another origin.
        ws = f"tls-{uuid.uuid4()}"
        events_url = f"{relay.url}/v1/workspaces/{ws}/events?bodies=1"
        pages.page = (PAGE % {"url": json.dumps(events_url)}).encode()
        with chromium(
            chromium_bin,
            f"{pages.origin}/page.html",
            tmp_path / "profile-es",
            log=tmp_path / "chromium.log",
            env=trusted,
        ):
            wait_for(lambda: pages.of_kind("open"), 30, "the EventSource to open over HTTPS")
            r = httpx.post(
                f"{relay.url}/v1/workspaces/{ws}/envelopes", json={"over": "tls"}, verify=verify
            )
            assert r.status_code == 200, r.text
            got = wait_for(lambda: pages.of_kind("message"), 15, "the envelope in the browser")
            assert got[0]["data"] == {"seq": r.json()["seq"], "body": {"over": "tls"}}
            assert got[0]["id"] == str(r.json()["seq"])
            assert not pages.of_kind("error")
    finally:
        pages.close()
        if relay.proc is not None:
            relay.stop()
