"""A real headless Chromium on the status page of a relay under a little load, with
the page's Content-Security-Policy in force: the inline script runs (its hash is in
the policy), follows the samples stream and redraws the SVG charts, and the browser
reports no policy violation. Driven over the DevTools protocol; the screenshot is
kept in test-artifacts/status-charts.png.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import ARTIFACTS, DevTools, wait_for

from tests.conftest import require_tool
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Runs before the page's own script, outside its policy (DevTools injects it): it
# records every violation the page reports, the way a report-uri endpoint would.
LISTENER = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push({directive: e.violatedDirective, blocked: e.blockedURI,
                            sample: e.sample});
});
"""
STATE = """JSON.stringify({
  samples: Number(document.getElementById("charts").dataset.samples),
  asof: document.getElementById("asof").textContent,
  lines: Object.fromEntries([...document.querySelectorAll("figure.chart")].map((f) => [
    f.id.slice(6),
    {d: f.querySelector("path.line").getAttribute("d"),
     points: Number(f.querySelector("path.line").dataset.points),
     now: f.querySelector(".now").textContent}])),
  violations: window.__violations,
})"""


class Load:
    """A little traffic in a thread: publishes, reads and a few 404s, about 30/s."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ws = f"charts-{uuid.uuid4()}"
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while not self.stop.is_set():
                c.post(f"/v1/workspaces/{ws}/envelopes", json={"n": self.sent})
                c.get(f"/v1/workspaces/{ws}/envelopes?after={max(0, self.sent - 5)}")
                if self.sent % 5 == 0:
                    c.get("/v1/no-such-route")
                self.sent += 1
                time.sleep(0.05)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def state(browser: DevTools) -> dict[str, Any]:
    return json.loads(browser.evaluate(STATE))  # type: ignore[no-any-return]


def test_status_charts_render_live_under_the_csp(tmp_path: Path) -> None:
    chromium_bin = require_tool("chromium")
    env = {"HIVE_RELAY_STATUS_SAMPLE_SECS": "0.5", "HIVE_RELAY_PUSH_RATE": "0"}
    with RelayProcess(env=env) as relay, Load(relay.url) as load:
        time.sleep(2.5)  # a few samples in the rings before the page loads
        csp = httpx.get(relay.url + "/").headers["content-security-policy"]
        assert "script-src 'sha256-" in csp
        with DevTools(chromium_bin, tmp_path / "profile", ["--window-size=1280,1100"]) as browser:
            browser.call("Page.enable")
            browser.call("Runtime.enable")
            browser.call("Log.enable")
            browser.call("Page.addScriptToEvaluateOnNewDocument", source=LISTENER)
            browser.call("Page.navigate", url=relay.url + "/")
            first = wait_for(
                lambda: browser.evaluate("document.readyState") == "complete" and state(browser),
                20,
                "the status page to load",
            )
            # The script has taken over once it says "Live"; then it must redraw on
            # the samples that arrive after the page was served.
            live = wait_for(
                lambda: (
                    (s := state(browser))["asof"].startswith("Live")
                    and s["samples"] >= first["samples"] + 4
                    and s
                ),
                20,
                "the script to follow four new samples",
            )
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-charts.png"
            png = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            shot.write_bytes(base64.b64decode(png["data"]))
            (ARTIFACTS / "status-charts.json").write_text(json.dumps(live, indent=1))
            log = [e["params"]["entry"] for e in browser.events if e["method"] == "Log.entryAdded"]
            console = [
                e["params"]
                for e in browser.events
                if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"
            ]
            exceptions = [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"]

            # A control: the detector sees a violation when there is one. An inline
            # script the policy does not name is refused and reported.
            injected = browser.evaluate(
                "(() => { const s = document.createElement('script');"
                " s.textContent = 'window.__injected = 1;';"
                " document.body.appendChild(s); return window.__injected === undefined; })()"
            )
            refused = wait_for(
                lambda: browser.evaluate("window.__violations"), 10, "the control's violation"
            )

            # Without JavaScript the page still shows the charts as of its loading.
            browser.call("Emulation.setScriptExecutionDisabled", value=True)
            browser.call("Page.navigate", url=relay.url + "/")
            static = wait_for(
                lambda: (
                    browser.evaluate("document.readyState") == "complete"
                    and not browser.evaluate("window.__injected")
                    and state(browser)
                ),
                20,
                "the page without JavaScript",
            )
            png = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            (ARTIFACTS / "status-charts-nojs.png").write_bytes(base64.b64decode(png["data"]))
    assert load.sent > 20
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # charts drawn, not an empty page

    assert live["violations"] == [], live["violations"]
    assert not [e for e in log if "Content Security Policy" in e.get("text", "")], log
    assert not console and not exceptions, (console, exceptions)
    lines = live["lines"]
    for name in ("appends", "reads", "streams", "stored", "client_errors", "publish_p99"):
        assert lines[name]["points"] >= 8, (name, lines[name])
        assert lines[name]["d"].count("L") >= 7, (name, lines[name])
    assert lines["appends"]["now"].endswith("/s") and lines["appends"]["now"] != "0.0/s"
    assert lines["client_errors"]["now"].endswith("/s")
    assert injected is True
    assert static["asof"].startswith("The last")  # the server's text: no script ran
    for name in ("appends", "reads", "publish_p99"):
        assert static["lines"][name]["points"] >= 8, (name, static["lines"][name])
    assert refused[0]["directive"].startswith("script-src")
