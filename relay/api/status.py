"""The status page (`GET /`) and its samples stream (`GET /v1/status/samples`).

The page is one HTML document: the table of current figures, and one inline SVG
chart per series of relay.status, drawn on the server from the rings so that it
reads the same without JavaScript. A few lines of inline JavaScript then follow
the samples stream (SSE: the whole buffer first, then one event per sample) and
redraw the paths. The script and the style are constants, so the page's
Content-Security-Policy names them by hash; nothing else may run or load.

Both are public, like the page has always been: they show relay-wide figures
only (rates, counts, latencies), never a workspace id, token or address.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import math
import time
from collections.abc import Sequence

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from relay import __version__
from relay.errors import RelayError, error_response
from relay.runtime import Relay
from relay.status import Sampler, Series

W, H = 300, 80  # the charts' SVG coordinate box (the script uses the same)

STYLE = """
body{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.1rem;margin:1.6rem 0 .6rem}
p{color:#555;margin-top:0}
table{border-collapse:collapse;width:100%;max-width:40rem} th,td{text-align:left;
padding:.45rem .6rem;border-bottom:1px solid #ddd} th{width:45%;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(18rem,1fr));gap:1rem}
figure{margin:0} figcaption{font-size:.9rem;display:flex;gap:.5rem;align-items:baseline;
white-space:nowrap}
figcaption .now{margin-left:auto} figcaption small{color:#777}
svg{display:block;width:100%;height:5rem;background:#f7f8fa;border:1px solid #ddd}
.line{fill:none;stroke:#1f5fbf;stroke-width:1.5;vector-effect:non-scaling-stroke}
.limit{fill:none;stroke:#c0392b;stroke-width:1;stroke-dasharray:4 3;
vector-effect:non-scaling-stroke}
"""

SCRIPT = """
"use strict";
(() => {
  const W = 300, H = 80;
  const root = document.getElementById("charts");
  const asof = document.getElementById("asof");
  let meta = null, times = [], values = {};
  const units = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 1024]];
  const fmt = (v, unit) => {
    if (v === null || v === undefined) return "\\u2013";
    if (unit === "bytes") {
      for (const [name, size] of units) if (v >= size) return (v / size).toFixed(1) + " " + name;
      return Math.round(v) + " B";
    }
    if (unit === "s") {
      const ms = v * 1000;
      return ms.toFixed(ms < 10 ? 2 : ms < 100 ? 1 : 0) + " ms";
    }
    if (unit === "/s") return (v < 10 ? v.toFixed(1) : String(Math.round(v))) + "/s";
    return String(Math.round(v));
  };
  const nice = (top, unit) => {
    if (!(top > 0)) return unit === "s" ? 0.001 : 1;
    const mag = 10 ** Math.floor(Math.log10(top));
    for (const m of [1, 2, 5]) if (top <= m * mag * 1.000001) return m * mag;
    return 10 * mag;
  };
  const pct = (v, limit) => " (" + ((100 * v) / limit).toFixed(1) + " %)";
  const ago = (secs) => (secs < 120 ? Math.round(secs) + " s" : Math.round(secs / 60) + " min");
  const clock = (t) => new Date(t * 1000).toISOString().slice(11, 19) + " UTC";
  function draw() {
    const now = times.length ? times[times.length - 1] : 0;
    const span = times.length > 1 ? Math.max(now - times[0], meta.interval) : meta.interval;
    for (const s of meta.series) {
      const fig = document.getElementById("chart-" + s.name);
      if (!fig) continue;
      const vs = values[s.name] || [];
      let top = 0;
      for (const v of vs) if (v !== null && v > top) top = v;
      // Against a limit (the memory budget) the scale is the limit itself.
      top = s.limit === null ? nice(top, s.unit) : Math.max(top, s.limit);
      let d = "", pen = false, points = 0;
      vs.forEach((v, i) => {
        const x = W - ((now - times[i]) / span) * W;
        if (v === null || x < 0) { pen = false; return; }
        const y = H - (Math.min(v, top) / top) * H;
        d += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1) + " ";
        pen = true;
        points++;
      });
      const line = fig.querySelector(".line");
      line.setAttribute("d", d.trim());
      line.setAttribute("data-points", String(points));
      if (s.limit !== null) {
        const y = (H - (s.limit / top) * H).toFixed(1);
        fig.querySelector(".limit").setAttribute("d", "M0 " + y + " L" + W + " " + y);
      }
      const last = vs.length ? vs[vs.length - 1] : null;
      fig.querySelector(".now").textContent =
        fmt(last, s.unit) + (s.limit !== null && last !== null ? pct(last, s.limit) : "");
      fig.querySelector(".top").textContent = "scale " + fmt(top, s.unit);
    }
    asof.textContent = "Live: the last " + ago(span) + " (up to 15 minutes), updated " +
      clock(now) + ".";
    root.dataset.samples = String(meta.count);
  }
  const es = new EventSource("v1/status/samples");
  es.addEventListener("buffer", (e) => {
    meta = JSON.parse(e.data);
    times = meta.t;
    values = meta.values;
    draw();
  });
  es.addEventListener("sample", (e) => {
    if (meta === null) return;
    const s = JSON.parse(e.data);
    times.push(s.t);
    for (const name of Object.keys(values)) {
      values[name].push(name in s.values ? s.values[name] : null);
    }
    while (times.length > meta.capacity) {
      times.shift();
      for (const name of Object.keys(values)) values[name].shift();
    }
    meta.count = s.count;
    draw();
  });
  es.onerror = () => { asof.textContent = "Reconnecting to the relay\\u2026"; };
})();
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (
    "default-src 'none'; "
    f"script-src {_hash(SCRIPT)}; "
    f"style-src {_hash(STYLE)}; "
    "connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ------------------------------------------------------------ formatting
_BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 1024))


def fmt(value: float | None, unit: str) -> str:
    """A figure as the page shows it (the script's fmt says the same)."""
    if value is None:
        return "\u2013"
    if unit == "bytes":
        for name, size in _BYTE_UNITS:
            if value >= size:
                return f"{value / size:.1f} {name}"
        return f"{round(value)} B"
    if unit == "s":
        ms = value * 1000
        return f"{ms:.{2 if ms < 10 else 1 if ms < 100 else 0}f} ms"
    if unit == "/s":
        return (f"{value:.1f}" if value < 10 else str(round(value))) + "/s"
    return str(round(value))


def nice_top(top: float, unit: str) -> float:
    """The chart's scale: the next 1, 2 or 5 times a power of ten at or above `top`."""
    if not top > 0:
        return 0.001 if unit == "s" else 1.0
    mag = 10.0 ** math.floor(math.log10(top))
    for m in (1, 2, 5):
        if top <= m * mag * 1.000001:
            return m * mag
    return 10 * mag


def pct(value: float, limit: float) -> str:
    return f" ({100 * value / limit:.1f} %)"


def ago(secs: float) -> str:
    return f"{round(secs)} s" if secs < 120 else f"{round(secs / 60)} min"


def held_span(times: Sequence[float], interval: float) -> float:
    """The x axis: the time the rings hold (15 minutes once full), oldest at the left."""
    return max(times[-1] - times[0], interval) if len(times) > 1 else interval


def chart_path(
    times: Sequence[float], values: Sequence[float | None], now: float, span: float, top: float
) -> tuple[str, int]:
    """The SVG path of one series (a gap breaks the line), and its number of points."""
    parts: list[str] = []
    pen = False
    for t, v in zip(times, values, strict=True):
        x = W - (now - t) / span * W
        if v is None or x < 0:
            pen = False
            continue
        y = H - min(v, top) / top * H
        parts.append(f"{'L' if pen else 'M'}{x:.1f} {y:.1f}")
        pen = True
    return " ".join(parts), len(parts)


def _chart(series: Series, times: list[float], now: float, span: float) -> str:
    values = series.ring.values()
    limit = series.limit() if series.limit is not None else None
    top = max([v for v in values if v is not None] + [0.0])
    # Against a limit (the memory budget) the scale is the limit itself.
    top = nice_top(top, series.unit) if limit is None else max(top, limit)
    d, points = chart_path(times, values, now, span, top)
    limit_d = ""
    if limit is not None:
        y = f"{H - limit / top * H:.1f}"
        limit_d = f"M0 {y} L{W} {y}"
    label = html.escape(series.label)
    last = values[-1] if values else None
    now_text = fmt(last, series.unit)
    if limit is not None and last is not None:
        now_text += pct(last, limit)
    per = {"/s": " per second", "s": "", "bytes": " in bytes", "": ""}[series.unit]
    return (
        f'<figure class="chart" id="chart-{series.name}">'
        f"<figcaption><span>{label}</span>"
        f'<small class="top">scale {html.escape(fmt(top, series.unit))}</small>'
        f'<b class="now">{html.escape(now_text)}</b>'
        "</figcaption>"
        f'<svg viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img" '
        f'aria-label="{label}{per}, up to the last 15 minutes">'
        f'<path class="limit" d="{limit_d}"/>'
        f'<path class="line" d="{d}" data-points="{points}"/></svg></figure>'
    )


def charts_html(sampler: Sampler) -> str:
    times = sampler.times.values()
    now = times[-1] if times else time.time()
    span = held_span(times, sampler.interval)
    figures = "\n".join(_chart(s, times, now, span) for s in sampler.series.values())
    when = time.strftime("%H:%M:%S UTC", time.gmtime(now))
    every = f"{sampler.interval:g}"
    return (
        f'<p id="asof">The last {ago(span)} (up to 15 minutes) as of {when}, '
        f"one sample every {every} s.</p>\n"
        f'<section class="charts" id="charts" data-samples="{sampler.count}">\n'
        f"{figures}\n</section>"
    )


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    return " ".join([*parts, f"{hours}h", f"{minutes}m", f"{s}s"])


def _transport(relay: Relay) -> str:
    tls = relay.tls
    if tls is None:
        return "plain HTTP (TLS, if any, ends at a proxy in front)"
    return f"TLS (served by the relay): {tls.certificate.describe()}"


async def _rows(relay: Relay) -> list[tuple[str, str]]:
    stats = await relay.store.stats()
    rows = [
        ("Version", __version__),
        ("Uptime", _uptime(time.time() - relay.started)),
        ("Store", relay.settings.store.split("://", 1)[0]),
        ("Access", relay.policy.name),
        ("Transport", _transport(relay)),
        (
            "Workers",
            f"{relay.settings.workers} (this page from one of them)"
            if relay.settings.workers > 1
            else "1",
        ),
        ("Workspaces", f"{stats.workspaces:,}"),
        ("Envelopes retained", f"{stats.envelopes:,}"),
        ("Stored body bytes", f"{stats.stored_bytes:,}"),
        ("Live streams", f"{relay.slots.total:,}"),
    ]
    journal = relay.journal
    if journal is not None:
        fs = journal.stats.fsync_seconds
        per = journal.stats.records_per_fsync
        rows += [
            ("Durability", f"journal, fsync {journal.mode}"),
            ("Journal", "failed: writes refused until restart" if journal.failed else "ok"),
            ("Journal size", f"{journal.total_bytes:,} bytes"),
            (
                "fsync latency p50 / p99",
                f"{fs.quantile(0.5) * 1000:.2f} ms / {fs.quantile(0.99) * 1000:.2f} ms",
            ),
            ("Records per fsync (mean)", f"{per.total / per.n:.1f}" if per.n else "–"),
        ]
    return rows


async def status_page(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in await _rows(relay)
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hive-relay</title>
<style>{STYLE}</style></head>
<body><h1>hive-relay</h1>
<p>A content-blind relay for end-to-end-encrypted event envelopes. It stores ciphertext only.</p>
<h2>Now</h2>
<table>
{table}
</table>
<h2>Recent</h2>
{charts_html(relay.sampler)}
<p><a href="/v1/health">health</a> · <a href="/openapi.json">API</a> ·
<a href="/v1/status/samples">samples</a></p>
<script>{SCRIPT}</script>
</body></html>
"""
    return HTMLResponse(page, headers={"content-security-policy": CSP, "cache-control": "no-store"})


# ------------------------------------------------------------ the stream
def _event(kind: bytes, data: object) -> bytes:
    return b"event: " + kind + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


async def samples(request: Request) -> Response:
    relay: Relay = request.app.state.relay
    if relay.hub.closing or relay.sampler.closed:
        raise RelayError(503, "shutting_down", "the relay is shutting down", retry_after=2)
    return SamplesStream(relay, relay.client(request.scope))


class SamplesStream(Response):
    """text/event-stream of the sampler: `buffer` (everything held) first, then one
    `sample` per interval. Holds a status-stream slot (its own small cap, apart from
    the devices' live streams) for its whole life."""

    def __init__(self, relay: Relay, client: str) -> None:
        self.relay = relay
        self.client = client
        self.status_code = 200
        self.background = None
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with self.relay.status_slots.hold(self.client):
                await self._serve(receive, send)
        except RelayError as exc:
            if self.started:
                raise
            await error_response(exc.status, exc.code, exc.message, exc.headers)(
                scope, receive, send
            )

    async def _serve(self, receive: Receive, send: Send) -> None:
        sampler = self.relay.sampler
        with anyio.CancelScope() as cancel_scope:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                cancel_scope.cancel()

            watcher = asyncio.get_running_loop().create_task(watch_disconnect())
            try:
                await self._stream(sampler, send)
            finally:
                watcher.cancel()

    async def _stream(self, sampler: Sampler, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True
        # A browser that lost the stream comes back after about one interval.
        retry = b"retry: %d\n" % max(1000, int(sampler.interval * 1000))
        seen = sampler.count
        body = retry + _event(b"buffer", sampler.snapshot())
        await send({"type": "http.response.body", "body": body, "more_body": True})
        keepalive = self.relay.settings.keepalive_secs
        while not (sampler.closed or self.relay.hub.closing):
            if not await sampler.wait_after(seen, keepalive):
                if sampler.closed:
                    break
                chunk = b": keep-alive\n\n"
            elif sampler.count == seen + 1:
                chunk = _event(b"sample", sampler.newest())
            else:  # missed samples while the socket was slow: everything again
                chunk = _event(b"buffer", sampler.snapshot())
            seen = sampler.count
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
