"""A real browser: headless Chromium on the status page, and a real EventSource.

The EventSource page is served from a test origin that the relay allows with
HIVE_RELAY_CORS_ORIGINS; it reports everything it sees by POSTing to the test's
own little HTTP server. Between the browser and the relay sits a TCP hop the
test can cut, so the test drops the stream, pushes while the browser is away,
and watches the browser come back with Last-Event-ID and receive exactly what
it missed.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import ARTIFACTS, CuttableForwarder, chromium, run_chromium, wait_for

from tests.conftest import require_tool
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>eventsource e2e</title></head>
<body><pre id="log"></pre>
<script>
const url = %(url)s;
let n = 0;
function report(kind, extra) {
  const item = Object.assign({kind: kind, n: n++}, extra || {});
  document.getElementById("log").textContent += JSON.stringify(item) + "\\n";
  fetch("/report", {method: "POST", body: JSON.stringify(item)});
}
const es = new EventSource(url);
es.onopen = () => report("open", {state: es.readyState});
es.onerror = () => report("error", {state: es.readyState});
es.onmessage = (e) => report("message", {id: e.lastEventId, data: JSON.parse(e.data)});
es.addEventListener("gap", (e) => report("gap", {data: JSON.parse(e.data)}));
</script></body></html>
"""


class PageServer:
    """Serves the test page and collects the page's reports."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.page = b""
        lock = threading.Lock()
        reports = self.reports
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.page if self.path == "/page.html" else b"not found"
                self.send_response(200 if self.path == "/page.html" else 404)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("content-length", "0")))
                with lock:
                    reports.append(json.loads(data))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return sorted((r for r in list(self.reports) if r["kind"] == kind), key=lambda r: r["n"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def chromium_bin() -> str:
    return require_tool("chromium")


def test_status_page_in_chromium(chromium_bin: str, tmp_path: Path) -> None:
    with RelayProcess() as relay:
        for n in range(3):
            r = httpx.post(f"{relay.url}/v1/workspaces/status-e2e/envelopes", json={"n": n})
            assert r.status_code == 200
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        run_chromium(
            chromium_bin,
            ["--window-size=1024,768", f"--screenshot={shot}", relay.url + "/"],
            tmp_path / "profile-shot",
        )
        dom = run_chromium(chromium_bin, ["--dump-dom", relay.url + "/"], tmp_path / "profile-dom")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 5000  # a rendered page, not an empty canvas
    (ARTIFACTS / "status-page.html").write_text(dom)
    assert "<h1>hive-relay</h1>" in dom
    rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", dom))
    assert rows["Workspaces"] == "1"
    assert rows["Envelopes retained"] == "3"
    assert rows["Store"] == "memory"
    assert rows["Access"] == "open"
    assert "status-e2e" not in dom  # no workspace ids on the public page


def test_eventsource_receives_bodies_and_resumes_with_last_event_id(
    chromium_bin: str, tmp_path: Path
) -> None:
    ws = f"browser-{uuid.uuid4()}"
    forwarder: CuttableForwarder | None = None
    # The page's origin (another port than the relay's) is the one CORS allows.
    pages = PageServer()
    relay = RelayProcess(env={"HIVE_RELAY_CORS_ORIGINS": pages.origin})
    try:
        relay.start()
        forwarder = CuttableForwarder(relay.port)
        events_url = f"http://127.0.0.1:{forwarder.port}/v1/workspaces/{ws}/events?bodies=1"
        pages.page = (PAGE % {"url": json.dumps(events_url)}).encode()

        def push(n: int) -> int:
            r = httpx.post(f"{relay.url}/v1/workspaces/{ws}/envelopes", json={"n": n}, timeout=5)
            assert r.status_code == 200, r.text
            return int(r.json()["seq"])

        with chromium(
            chromium_bin,
            f"{pages.origin}/page.html",
            tmp_path / "profile",
            log=tmp_path / "chromium.log",
        ):
            wait_for(lambda: pages.of_kind("open"), 20, "the EventSource to open")
            seqs = [push(0), push(1)]
            got = wait_for(
                lambda: len(pages.of_kind("message")) >= 2 and pages.of_kind("message"),
                10,
                "two live envelopes in the browser",
            )
            assert [m["data"] for m in got] == [
                {"seq": s, "body": {"n": i}} for i, s in enumerate(seqs)
            ]
            assert [m["id"] for m in got] == [str(s) for s in seqs]

            # Drop the stream; hold the browser's reconnect at the door.
            forwarder.hold()
            forwarder.cut()
            wait_for(lambda: pages.of_kind("error"), 10, "the browser to see the drop")
            heads_before = len(forwarder.heads)
            missed = push(2)  # appended while the browser is away
            wait_for(lambda: forwarder.held >= 1, 15, "the browser to reconnect")
            forwarder.release()
            got = wait_for(
                lambda: len(pages.of_kind("message")) >= 3 and pages.of_kind("message"),
                10,
                "the missed envelope after the reconnect",
            )
            assert got[2]["data"] == {"seq": missed, "body": {"n": 2}}
            assert got[2]["id"] == str(missed)
            # The reconnect carried the last id the browser had.
            wait_for(lambda: len(forwarder.heads) > heads_before, 5, "the reconnect request")
            reconnect = b"".join(forwarder.heads[heads_before:]).decode("latin-1").lower()
            assert f"last-event-id: {seqs[1]}" in reconnect
            assert len(pages.of_kind("open")) >= 2

            # And live delivery goes on after the resume, still without duplicates.
            last = push(3)
            got = wait_for(
                lambda: len(pages.of_kind("message")) >= 4 and pages.of_kind("message"),
                10,
                "a live envelope after the resume",
            )
            ids = [m["id"] for m in got]
            assert ids == [str(s) for s in [*seqs, missed, last]]
            assert len(set(ids)) == len(ids)
    finally:
        if forwarder is not None:
            forwarder.close()
        pages.close()
        if relay.proc is not None:
            relay.stop()
