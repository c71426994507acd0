"""The status page's recent history: rings, series, the page's charts, the samples stream."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from relay.metrics import BUCKETS
from relay.status import (
    Ring,
    RoundTrip,
    Sampler,
    quantile_of_buckets,
    rate,
    window_quantile,
)
from tests.redisproc import RedisServer
from tests.relayproc import RelayProcess
from tests.support import make_client

SECRET_WS = "ws-secret-status-5d1e0c"
TOKEN = "tok-status-77a1"


# ------------------------------------------------------------------- rings
def test_ring_keeps_the_last_values_oldest_first() -> None:
    ring: Ring[int] = Ring(3)
    assert ring.values() == [] and ring.capacity == 3
    for n in range(7):
        ring.append(n)
    assert ring.values() == [4, 5, 6]
    assert len(ring) == 3
    with pytest.raises(ValueError):
        Ring(0)


def test_sampler_holds_fifteen_minutes_at_its_interval() -> None:
    assert Sampler(5.0).capacity == 180
    assert Sampler(0.5).capacity == 1800
    with pytest.raises(ValueError):
        Sampler(0)


def test_every_ring_lines_up_with_the_timestamps() -> None:
    sampler = Sampler(5.0)
    value = [1.0]
    sampler.register_series("a", lambda: value[0], label="A")
    sampler.sample(now=100.0)
    value[0] = 2.0
    sampler.sample(now=105.0)
    sampler.register_series("late", lambda: 9.0, label="Late")  # starts with gaps
    sampler.sample(now=110.0)
    snap = sampler.snapshot()
    assert snap["t"] == [100.0, 105.0, 110.0]
    assert snap["values"] == {"a": [1.0, 2.0, 2.0], "late": [None, None, 9.0]}
    assert snap["count"] == 3
    assert sampler.newest() == {"count": 3, "t": 110.0, "values": {"a": 2.0, "late": 9.0}}
    with pytest.raises(ValueError):
        sampler.register_series("a", lambda: 0.0, label="again")


def test_a_broken_or_non_finite_series_is_a_gap_and_the_others_go_on() -> None:
    sampler = Sampler(1.0)

    def broken() -> float:
        raise RuntimeError("boom")

    sampler.register_series("broken", broken, label="B")
    sampler.register_series("nan", lambda: math.nan, label="N")
    sampler.register_series("inf", lambda: math.inf, label="I")
    sampler.register_series("ok", lambda: 3, label="OK")
    assert sampler.sample(now=1.0) == {"broken": None, "nan": None, "inf": None, "ok": 3.0}


def test_memory_stays_fixed_however_long_it_samples() -> None:
    sampler = Sampler(1.0, window=10)
    sampler.register_series("a", lambda: 1.0, label="A")
    for n in range(1000):
        sampler.sample(now=float(n))
    snap = sampler.snapshot()
    assert len(snap["t"]) == 10 and len(snap["values"]["a"]) == 10
    assert snap["t"][0] == 990.0 and snap["count"] == 1000


# ------------------------------------------------------------ series kinds
def test_rate_is_per_second_since_the_previous_read() -> None:
    total, now = [0.0], [0.0]
    read = rate(lambda: total[0], clock=lambda: now[0])
    total[0], now[0] = 50.0, 5.0
    assert read() == 10.0
    total[0], now[0] = 50.0, 10.0
    assert read() == 0.0
    total[0], now[0] = 40.0, 15.0  # a counter never goes down; if it did, no negative rate
    assert read() == 0.0
    assert read() is None  # no time passed


def test_quantile_of_buckets_interpolates_inside_its_bucket() -> None:
    bounds = (0.001, 0.0025, 0.005)
    # 100 observations, all between 1 ms and 2.5 ms: p99 is 99 % of the way up.
    assert quantile_of_buckets([0, 100, 0, 0], bounds, 0.99) == pytest.approx(0.001 + 0.0015 * 0.99)
    # 98 fast ones and 2 slow ones: p99 lands in the slow bucket.
    p99 = quantile_of_buckets([98, 0, 2, 0], bounds, 0.99)
    assert p99 is not None and 0.0025 < p99 <= 0.005
    assert quantile_of_buckets([0, 0, 0, 5], bounds, 0.99) == 0.005  # past the last bound
    assert quantile_of_buckets([0, 0, 0, 0], bounds, 0.99) is None  # nothing observed


def test_window_quantile_sees_only_the_interval_since_the_previous_read() -> None:
    counts = [0] * (len(BUCKETS) + 1)
    read = window_quantile(lambda: counts, BUCKETS, 0.99)
    counts[BUCKETS.index(1.0)] += 10  # ten slow publishes (0.25 s – 1 s)
    slow = read()
    assert slow is not None and 0.25 < slow <= 1.0
    counts[0] += 1000  # then only fast ones: the slow ones are history
    fast = read()
    assert fast is not None and fast <= BUCKETS[0]
    assert read() is None  # an interval without publishes is a gap, not 0 ms


def test_round_trip_is_measured_and_a_failure_is_a_gap() -> None:
    fail = [False]

    async def call() -> None:
        await anyio.sleep(0.001)
        if fail[0]:
            raise OSError("down")

    trip = RoundTrip(call)

    async def main() -> None:
        await trip.probe()
        first = trip.read()
        assert first is not None and first > 0
        assert trip.read() is None  # handed out once: no stale value in the next sample
        fail[0] = True
        with pytest.raises(OSError):
            await trip.probe()
        assert trip.read() is None

    anyio.run(main)


def test_readers_wait_for_the_next_sample_and_wake_at_close() -> None:
    async def main() -> None:
        sampler = Sampler(0.01)
        sampler.register_series("a", lambda: 1.0, label="A")
        assert not await sampler.wait_after(0, 0.01)  # nothing yet: times out
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            assert await sampler.wait_after(0, 5)
            assert await sampler.wait_after(sampler.count, 5)  # and the next one
            sampler.close()
            assert not await sampler.wait_after(sampler.count, 5)  # closed: at once
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_the_sampler_runs_its_probes_before_each_sample() -> None:
    async def main() -> None:
        sampler = Sampler(0.01)
        order: list[str] = []

        async def probe() -> None:
            order.append("probe")

        sampler.add_probe(probe)
        sampler.register_series("a", lambda: order.append("read") or 1.0, label="A")
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            assert await sampler.wait_after(1, 5)
            sampler.close()
            tg.cancel_scope.cancel()
        assert order[:4] == ["probe", "read", "probe", "read"]

    anyio.run(main)


# ---------------------------------------------------------- page, in-process
def line_paths(page: str) -> dict[str, tuple[str, int]]:
    """chart id → (the line's d, its data-points)."""
    out = {}
    for fig in re.findall(r'<figure class="chart" id="chart-(\w+)">(.*?)</figure>', page, re.S):
        name, body = fig
        m = re.search(r'<path class="line" d="([^"]*)" data-points="(\d+)"', body)
        assert m, body
        out[name] = (m.group(1), int(m.group(2)))
    return out


def test_the_page_draws_the_charts_on_the_server() -> None:
    with make_client() as c:
        relay = c.app.state.relay  # type: ignore[attr-defined]
        sampler = relay.sampler
        for _ in range(3):
            for _ in range(5):
                assert c.post(f"/v1/workspaces/{SECRET_WS}/envelopes", content=b"{}").is_success
                assert c.get(f"/v1/workspaces/{SECRET_WS}/envelopes").is_success
            c.get("/nope")  # a 404: the 4xx chart
            sampler.sample()
        page = c.get("/").text
    paths = line_paths(page)
    assert set(paths) >= {
        "appends",
        "reads",
        "streams",
        "stored",
        "client_errors",
        "server_errors",
        "publish_p99",
    }
    assert "redis_rtt" not in paths  # the memory store has no Redis
    assert "fsync_p99" not in paths  # and no journal without a data directory
    for name in ("appends", "reads", "stored", "client_errors", "publish_p99"):
        d, points = paths[name]
        assert points >= 2, (name, d)
        assert len(re.findall(r"[ML]-?\d", d)) == points
    # The newest sample sits at the right edge; the budget has its limit line.
    assert paths["appends"][0].split("L")[-1].startswith("300.0 ")
    assert re.search(r'id="chart-stored">.*?<path class="limit" d="M0 [\d.]+ L300', page, re.S)
    assert SECRET_WS not in page


def test_the_journal_adds_its_fsync_chart(tmp_path: Any) -> None:
    with make_client(data_dir=str(tmp_path)) as c:
        assert c.post("/v1/workspaces/w/envelopes", content=b"{}").is_success
        c.app.state.relay.sampler.sample()  # type: ignore[attr-defined]
        paths = line_paths(c.get("/").text)
    assert paths["fsync_p99"][1] == 1


def test_publish_latency_counts_successful_publishes_only() -> None:
    with make_client(max_body_bytes=64) as c:
        publish = c.app.state.relay.metrics.publish  # type: ignore[attr-defined]
        assert c.post("/v1/workspaces/w/envelopes", content=b"{}").is_success
        assert c.post("/v1/workspaces/w/envelopes/batch", content=b"[{}]").is_success
        assert c.get("/v1/workspaces/w/envelopes").is_success  # a read, not a publish
        assert c.post("/v1/workspaces/w/envelopes", content=b"x" * 100).status_code == 413
        assert sum(publish.counts) == 2


# ------------------------------------------------------- real relay process
def events(stream: Iterator[ServerSentEvent], n: int) -> list[ServerSentEvent]:
    return [next(stream) for _ in range(n)]


@pytest.fixture(scope="module")
def relay() -> Iterator[RelayProcess]:
    env = {"HIVE_RELAY_STATUS_SAMPLE_SECS": "0.2", "HIVE_RELAY_PUSH_RATE": "0"}
    with RelayProcess(env=env) as proc:
        yield proc


def test_samples_stream_sends_the_buffer_then_each_sample(relay: RelayProcess) -> None:
    with (
        httpx.Client(base_url=relay.url, timeout=10) as c,
        connect_sse(c, "GET", "/v1/status/samples") as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["x-content-type-options"] == "nosniff"
        stream = source.iter_sse()
        first = next(stream)
        assert first.event == "buffer"
        buffer = json.loads(first.data)
        assert buffer["interval"] == 0.2 and buffer["capacity"] == 4500
        names = [s["name"] for s in buffer["series"]]
        assert names[:3] == ["appends", "reads", "streams"]
        assert len(buffer["t"]) == buffer["count"] >= 1
        assert all(len(v) == len(buffer["t"]) for v in buffer["values"].values())
        for _ in range(20):
            assert c.post("/v1/workspaces/status-load/envelopes", json={}).is_success
        samples = [json.loads(e.data) for e in events(stream, 6)]
    counts = [s["count"] for s in samples]
    assert counts == list(range(counts[0], counts[0] + 6))  # one event per sample, in order
    assert counts[0] == buffer["count"] + 1
    assert sum(s["values"]["appends"] for s in samples) > 0
    assert any(s["values"]["publish_p99"] for s in samples)
    assert all(set(s["values"]) == set(names) for s in samples)


def test_samples_streams_have_their_own_small_cap(relay: RelayProcess) -> None:
    with httpx.Client(base_url=relay.url, timeout=10) as c:
        with contextlib.ExitStack() as stack:
            held = []  # an iterator dropped would close its stream
            for _ in range(4):
                source = stack.enter_context(connect_sse(c, "GET", "/v1/status/samples"))
                held.append(source.iter_sse())
                assert next(held[-1]).event == "buffer"
            r = c.get("/v1/status/samples")
            assert r.status_code == 503
            assert r.json()["error"] == "too_many_status_streams_for_client"
            assert int(r.headers["retry-after"]) >= 1
            # They are not devices' live streams: those caps and gauges are untouched,
            # and a device still gets its stream.
            metrics = c.get("/metrics").text
            assert "hive_relay_live_streams 0.0" in metrics
            assert 'hive_relay_unavailable_total{reason="too_many_status_streams_for_client"}' in (
                metrics
            )
            with c.stream("GET", "/v1/workspaces/w/events") as device:
                assert device.status_code == 200
        # Closed streams give their slots back (once the relay has seen them go).
        deadline = time.monotonic() + 10
        while True:
            with connect_sse(c, "GET", "/v1/status/samples") as source:
                if source.response.status_code == 200:
                    assert next(source.iter_sse()).event == "buffer"
                    break
            assert time.monotonic() < deadline, "the slots were not given back"
            time.sleep(0.05)


def test_the_relay_wide_cap_on_samples_streams() -> None:
    env = {"HIVE_RELAY_MAX_STATUS_STREAMS": "1"}
    with RelayProcess(env=env) as proc, httpx.Client(base_url=proc.url, timeout=10) as c:
        with connect_sse(c, "GET", "/v1/status/samples") as source:
            stream = source.iter_sse()
            assert next(stream).event == "buffer"
            r = c.get("/v1/status/samples")
            assert r.status_code == 503
            assert r.json()["error"] == "too_many_status_streams"


def test_with_the_gate_on_page_and_stream_are_public_and_show_no_workspace() -> None:
    env = {"HIVE_RELAY_ACCESS_TOKENS": TOKEN, "HIVE_RELAY_STATUS_SAMPLE_SECS": "0.2"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with RelayProcess(env=env) as proc, httpx.Client(base_url=proc.url, timeout=10) as c:
        for _ in range(5):
            r = c.post(f"/v1/workspaces/{SECRET_WS}/envelopes", json={}, headers=auth)
            assert r.is_success
        assert c.get(f"/v1/workspaces/{SECRET_WS}/envelopes").status_code == 401
        time.sleep(0.5)
        page = c.get("/")
        assert page.status_code == 200
        with connect_sse(c, "GET", "/v1/status/samples") as source:  # no token
            got = events(source.iter_sse(), 3)
    text = page.text + "".join(e.data for e in got)
    assert SECRET_WS not in text and TOKEN not in text
    buffer = json.loads(got[0].data)
    assert sum(v for v in buffer["values"]["appends"] if v) > 0  # relay-wide figures only
    assert sum(v for v in buffer["values"]["client_errors"] if v) > 0  # the 401


def test_shutdown_ends_open_samples_streams() -> None:
    proc = RelayProcess().start()
    try:
        with (
            httpx.Client(base_url=proc.url, timeout=10) as c,
            connect_sse(c, "GET", "/v1/status/samples") as source,
        ):
            stream = source.iter_sse()
            assert next(stream).event == "buffer"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for _ in stream:  # the stream ends (the relay does not wait it out)
                pass
            assert time.monotonic() - started < 10
    finally:
        code = proc.stop()
    assert code == 0, proc.logs()


def test_redis_round_trip_is_charted(tmp_path: Any) -> None:
    with RedisServer() as server:
        env = {"HIVE_RELAY_STORE": server.url, "HIVE_RELAY_STATUS_SAMPLE_SECS": "0.2"}
        with RelayProcess(env=env) as proc, httpx.Client(base_url=proc.url, timeout=10) as c:
            with connect_sse(c, "GET", "/v1/status/samples") as source:
                stream = source.iter_sse()
                buffer = json.loads(next(stream).data)
                assert "redis_rtt" in [s["name"] for s in buffer["series"]]
                assert "stored" in [s["name"] for s in buffer["series"]]
                up = [json.loads(e.data)["values"]["redis_rtt"] for e in events(stream, 3)]
                assert all(v is not None and 0 < v < 2 for v in up), up
                server.pause()  # Redis stops answering: the round trip is a gap
                try:
                    down = [json.loads(e.data)["values"]["redis_rtt"] for e in events(stream, 3)]
                finally:
                    server.resume()
            assert None in down, down
            assert line_paths(c.get("/").text)["redis_rtt"][1] >= 3


def test_a_reader_that_fell_behind_gets_the_whole_buffer_again() -> None:
    with make_client() as c:  # a running relay (its hub not closed)
        relay = c.app.state.relay  # type: ignore[attr-defined]
        chunks = run_stream(relay)
    kinds = [re.findall(rb"^event: (\w+)", chunk, re.M) for chunk in chunks]
    assert kinds[:3] == [[b"buffer"], [b"buffer"], [b"sample"]]
    resent = json.loads(chunks[1].split(b"data: ", 1)[1])
    assert resent["count"] == 4 and len(resent["t"]) == 4
    assert chunks[-1] == b""  # closed: the answer ends


def run_stream(relay: Any) -> list[bytes]:
    from relay.api.status import SamplesStream

    sampler = Sampler(60.0)  # samples only when the test takes them
    sampler.register_series("a", lambda: 1.0, label="A")
    sampler.sample()
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        body = message.get("body")
        if body is None:
            return
        chunks.append(body)
        if len(chunks) == 1:  # while this send is stuck, three samples go by
            for _ in range(3):
                sampler.sample()
        elif len(chunks) == 2:
            sampler.sample()  # then one more, on time
        elif len(chunks) == 3:
            sampler.close()

    async def main() -> None:
        with anyio.fail_after(10):
            await SamplesStream(relay, "test")._stream(sampler, send)  # type: ignore[arg-type]

    anyio.run(main)
    return chunks
