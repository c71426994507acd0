"""The journal with real relay processes and real files: SIGKILL at random moments
under concurrent HTTP, batch, WebSocket, keyring and presence writers; an
instrumented writer proving no answer and no live row leaves before its fsync;
a disk that fills up (RLIMIT_FSIZE); a slow disk that stalls nothing else.

HIVE_RELAY_CRASH_ROUNDS sets how many kill-restart rounds the crash test runs
(default 4, about 10 s; the soak runs use hundreds).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from relay.store.journal import FRAME, MAGIC, list_segments
from tests.relayproc import RelayProcess

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("HIVE_RELAY_CRASH_ROUNDS", "4"))
WS = "crashws"


def journal_env(path: Path, **extra: str) -> dict[str, str]:
    return {
        "HIVE_RELAY_DATA_DIR": str(path),
        "HIVE_RELAY_PUSH_RATE": "0",
        "HIVE_RELAY_SIDE_RATE": "0",
        "HIVE_RELAY_ACCESS_LOG": "false",
        **extra,
    }


class Ledger:
    """What the writers were told was stored, and everything they tried."""

    def __init__(self) -> None:
        self.acked: dict[str, tuple[int, bytes]] = {}  # key → (seq, body)
        self.tried: dict[str, bytes] = {}  # key → body
        self.keyring: set[bytes] = set()
        self.keyring_tried: set[bytes] = set()
        self.presence: dict[str, list[bytes]] = {}  # device → values acked, in order
        self.presence_tried: dict[str, set[bytes]] = {}
        self.max_seq = 0

    def ack(self, key: str, seq: int) -> None:
        self.acked[key] = (seq, self.tried[key])
        self.max_seq = max(self.max_seq, seq)


async def http_writer(url: str, led: Ledger, tag: str, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        i = 0
        while not stop.is_set():
            key = f"{tag}-{i}"
            body = b'{"w":"%s","i":%d,"pad":"%s"}' % (tag.encode(), i, b"x" * (i % 300))
            led.tried[key] = body
            i += 1
            try:
                r = await c.post(
                    f"/v1/workspaces/{WS}/envelopes",
                    content=body,
                    headers={"idempotency-key": key, "content-type": "application/json"},
                )
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                led.ack(key, r.json()["seq"])


async def batch_writer(url: str, led: Ledger, tag: str, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        i = 0
        while not stop.is_set():
            keys = [f"{tag}-{i}-{j}" for j in range(8)]
            bodies = [b'{"b":"%s","j":%d}' % (k.encode(), j) for j, k in enumerate(keys)]
            led.tried.update(zip(keys, bodies, strict=True))
            i += 1
            try:
                r = await c.post(
                    f"/v1/workspaces/{WS}/envelopes/batch",
                    content=b"[" + b",".join(bodies) + b"]",
                    headers={"idempotency-keys": ",".join(keys)},
                )
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                for k, seq in zip(keys, r.json()["seqs"], strict=True):
                    led.ack(k, seq)


async def ws_writer(port: int, led: Ledger, tag: str, stop: asyncio.Event) -> None:
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/workspaces/{WS}/ws") as sock:
            i = 0
            while not stop.is_set():
                key = f"{tag}-{i}"
                body = b'{"ws":"%s"}' % key.encode()
                led.tried[key] = body
                i += 1
                await sock.send(
                    '{"op":"pub","key":"%s","ref":%d,"body":%s}' % (key, i, body.decode())
                )
                while True:
                    frame = json.loads(await sock.recv())
                    if frame.get("op") == "ack":
                        led.ack(key, frame["seq"])
                        break
                    if frame.get("op") == "error":
                        break
    except (websockets.exceptions.WebSocketException, OSError):
        return


async def side_writer(url: str, led: Ledger, tag: str, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        i = 0
        while not stop.is_set():
            i += 1
            blob = b'{"kr":"%s-%d"}' % (tag.encode(), i)
            led.keyring_tried.add(blob)
            device = f"{tag}-dev{i % 3}"
            value = b'{"n":%d}' % i
            led.presence_tried.setdefault(device, set()).add(value)
            try:
                r = await c.post(f"/v1/workspaces/{WS}/keyring", content=blob)
                if r.status_code == 200:
                    led.keyring.add(blob)
                r = await c.post(
                    f"/v1/workspaces/{WS}/presence",
                    content=b'{"device_id":"%s","data":%s}' % (device.encode(), value),
                )
                if r.status_code == 200:
                    led.presence.setdefault(device, []).append(value)
            except httpx.HTTPError:
                return


async def write_then_kill(
    relay: RelayProcess, led: Ledger, round_: int, rng: random.Random
) -> None:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(http_writer(relay.url, led, f"h{round_}a", stop)),
        asyncio.create_task(http_writer(relay.url, led, f"h{round_}b", stop)),
        asyncio.create_task(batch_writer(relay.url, led, f"b{round_}", stop)),
        asyncio.create_task(ws_writer(relay.port, led, f"w{round_}", stop)),
        asyncio.create_task(side_writer(relay.url, led, f"s{round_}", stop)),
    ]
    # The kill lands at a random moment after this round's writers are under way:
    # some acknowledged writes of every kind first (a loaded machine may take a
    # while to answer the first ones), so each round tests something.
    acked, keyring = len(led.acked), len(led.keyring)
    deadline = asyncio.get_running_loop().time() + 30
    while (
        len(led.acked) < acked + 10 or len(led.keyring) <= keyring or not led.presence
    ) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(rng.random() * 0.9)
    relay.send_signal(signal.SIGKILL)  # mid-flight: answers on the way are never read
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


def read_all(url: str) -> tuple[bytes, list[dict[str, Any]], httpx.Headers]:
    raw, out, after = b"", [], 0
    headers = httpx.Headers()
    with httpx.Client(base_url=url, timeout=10) as c:
        while True:
            r = c.get(f"/v1/workspaces/{WS}/envelopes", params={"after": after, "limit": 5000})
            assert r.status_code == 200
            headers = r.headers
            raw += r.content
            page = r.json()
            out += page
            if not page:
                return raw, out, headers
            after = page[-1]["seq"]


def check_everything_acked_is_there(url: str, led: Ledger) -> str:
    raw, rows, headers = read_all(url)
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(set(seqs))
    by_seq = {r["seq"]: r for r in rows}
    for key, (seq, body) in led.acked.items():
        # Byte for byte, with its seq.
        assert b'{"seq":%d,"body":%b}' % (seq, body) in raw, (key, seq)
    # Nothing half there: every row is whole and is one of the bodies we sent.
    sent = {json.dumps(json.loads(b), sort_keys=True) for b in led.tried.values()}
    for row in by_seq.values():
        assert json.dumps(row["body"], sort_keys=True) in sent, row
    with httpx.Client(base_url=url, timeout=10) as c:
        blobs = {
            json.dumps(b, sort_keys=True) for b in c.get(f"/v1/workspaces/{WS}/keyring").json()
        }
        for blob in led.keyring:
            assert json.dumps(json.loads(blob), sort_keys=True) in blobs
        assert blobs <= {json.dumps(json.loads(b), sort_keys=True) for b in led.keyring_tried}
        presence = c.get(f"/v1/workspaces/{WS}/presence").json()
        for device, values in led.presence.items():
            got = json.dumps(presence[device]).encode()
            # The last acknowledged value, or a later one whose answer was lost.
            assert got == values[-1].replace(b":", b": ") or json.loads(got) in [
                json.loads(v) for v in led.presence_tried[device]
            ]
            assert json.loads(got)["n"] >= json.loads(values[-1])["n"]
        # A retried acknowledged push is a duplicate with its seq.
        if led.acked:
            key, (seq, body) = next(iter(led.acked.items()))
            r = c.post(
                f"/v1/workspaces/{WS}/envelopes", content=body, headers={"idempotency-key": key}
            )
            assert r.json() == {"seq": seq, "duplicate": True}
    return headers["x-relay-epoch"]


def test_sigkill_under_concurrent_writers_loses_nothing_acknowledged(tmp_path: Path) -> None:
    # Small segments and a short interval, so rotations and checkpoints land
    # between kills too.
    env = journal_env(
        tmp_path, HIVE_RELAY_JOURNAL_SEGMENT_BYTES="65536", HIVE_RELAY_SNAPSHOT_INTERVAL="1"
    )
    rng = random.Random(int(os.environ.get("HIVE_RELAY_CRASH_SEED", "14")))
    led = Ledger()
    epoch = None
    for round_ in range(ROUNDS):
        relay = RelayProcess(env=env).start()
        if round_:
            seen = check_everything_acked_is_there(relay.url, led)
            assert seen == epoch, "always: a crash loses nothing acknowledged, the epoch stays"
            with httpx.Client(base_url=relay.url) as c:
                key, body = f"probe-{round_}", b'{"probe":%d}' % round_
                led.tried[key] = body
                r = c.post(
                    f"/v1/workspaces/{WS}/envelopes", content=body, headers={"idempotency-key": key}
                )
                assert r.json()["seq"] > led.max_seq  # seqs never rewind
                led.ack(key, r.json()["seq"])
        else:
            epoch = httpx.get(relay.url + f"/v1/workspaces/{WS}/envelopes").headers["x-relay-epoch"]
        asyncio.run(write_then_kill(relay, led, round_, rng))
        relay.stop()
        assert "Traceback" not in relay.logs()
    assert len(led.acked) > 50 and led.keyring and led.presence
    with RelayProcess(env=env) as relay:
        assert check_everything_acked_is_there(relay.url, led) == epoch


def synced_upto(trace: Path) -> tuple[int, int]:
    """(segment, offset): the writer synced every byte before it."""
    lines = trace.read_text().split() if trace.exists() else []
    return (int(lines[-2]), int(lines[-1])) if lines else (0, 0)


def seqs_synced(data_dir: Path, trace: Path) -> set[int]:
    """The seqs of envelope rows inside the synced part of the journal."""
    import msgspec

    seg_no, offset = synced_upto(trace)
    out: set[int] = set()
    for n, path in list_segments(data_dir):
        if n > seg_no:
            continue
        data = path.read_bytes()
        end = offset if n == seg_no else len(data)
        pos = len(MAGIC)
        while pos + FRAME.size <= end:
            size, _ = FRAME.unpack_from(data, pos)
            if pos + FRAME.size + size > end:
                break
            rec = msgspec.msgpack.decode(data[pos + FRAME.size : pos + FRAME.size + size])
            if rec[0] == "a":
                out.add(rec[2])
            elif rec[0] == "b":
                out.update(rec[2])
            pos += FRAME.size + size
    return out


def test_no_answer_and_no_live_row_leaves_before_its_fsync(tmp_path: Path) -> None:
    """The writer (HIVE_RELAY_TEST_JOURNAL_TRACE) notes how far each fsync reached
    once it returned; a slow fsync widens the window an early answer would show in.
    Every answer and every row a live subscriber gets must be inside it on arrival."""
    data, trace = tmp_path / "data", tmp_path / "trace"
    env = journal_env(
        data, HIVE_RELAY_TEST_JOURNAL_TRACE=str(trace), HIVE_RELAY_TEST_FSYNC_DELAY="0.05"
    )
    checked = {"acks": 0}
    acked: set[int] = set()
    live: set[int] = set()

    async def go(relay: RelayProcess) -> None:
        done = asyncio.Event()

        async def subscriber() -> None:
            url = f"ws://127.0.0.1:{relay.port}/v1/workspaces/{WS}/ws"
            async with websockets.connect(url) as sock:
                await sock.send('{"op":"sub","after":0}')
                deadline = asyncio.get_running_loop().time() + 30
                while not (done.is_set() and live >= acked):
                    assert asyncio.get_running_loop().time() < deadline, sorted(acked - live)
                    try:
                        frame = json.loads(await asyncio.wait_for(sock.recv(), 0.2))
                    except TimeoutError:
                        continue
                    if frame.get("op") == "env":
                        assert frame["seq"] in seqs_synced(data, trace), frame
                        live.add(frame["seq"])

        async def publisher(tag: str) -> None:
            async with httpx.AsyncClient(base_url=relay.url, timeout=10) as c:
                for i in range(15):
                    if i % 3 == 0:
                        r = await c.post(
                            f"/v1/workspaces/{WS}/envelopes/batch", json=[{tag: i}, {tag: -i - 1}]
                        )
                        got = r.json()["seqs"]
                    else:
                        r = await c.post(f"/v1/workspaces/{WS}/envelopes", json={tag: i})
                        got = [r.json()["seq"]]
                    synced = seqs_synced(data, trace)
                    assert set(got) <= synced, (got, synced_upto(trace))
                    acked.update(got)
                    checked["acks"] += 1

        sub = asyncio.create_task(subscriber())
        await asyncio.sleep(0.3)
        await asyncio.gather(*(publisher(t) for t in ("a", "b", "c")))
        done.set()
        await sub

    with RelayProcess(env=env) as relay:
        asyncio.run(go(relay))
    assert checked["acks"] == 45 and live == acked and len(acked) == 60


def test_a_full_disk_answers_503_loses_nothing_and_recovers_after_restart(tmp_path: Path) -> None:
    limit = 256 * 1024

    def small_files() -> None:
        # Writes past the limit fail with EFBIG (Python ignores SIGXFSZ).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = journal_env(tmp_path)
    relay = RelayProcess(env=env, preexec_fn=small_files).start()
    acked: list[tuple[int, bytes]] = []
    with httpx.Client(base_url=relay.url, timeout=10) as c:
        for i in range(1000):
            body = b'{"i":%d,"pad":"%s"}' % (i, b"y" * 1000)
            r = c.post("/v1/workspaces/full/envelopes", content=body)
            if r.status_code != 200:
                break
            acked.append((r.json()["seq"], body))
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1
        assert acked and len(acked) < 1000
        # Nothing more is taken, even a small write; reads go on; health says so.
        assert c.post("/v1/workspaces/other/keyring", content=b"{}").status_code == 503
        assert c.post("/v1/workspaces/full/envelopes", json=1).status_code == 503
        assert c.get("/v1/health").status_code == 503
        assert "failed: writes refused until restart" in c.get("/").text
        assert "hive_relay_journal_failed 1.0" in c.get("/metrics").text
        r = c.get("/v1/workspaces/full/envelopes", params={"limit": 10_000})
        assert r.status_code == 200 and [row["seq"] for row in r.json()] == [s for s, _ in acked]
    relay.stop()
    log = relay.logs()
    assert "the journal could not be written" in log and "Traceback" not in log
    with RelayProcess(env=env) as again, httpx.Client(base_url=again.url) as c:
        raw = c.get("/v1/workspaces/full/envelopes", params={"limit": 10_000}).content
        for seq, body in acked:
            assert b'{"seq":%d,"body":%b}' % (seq, body) in raw
        assert c.post("/v1/workspaces/full/envelopes", json="after").status_code == 200
        assert c.get("/v1/health").status_code == 200
        status = c.get("/").text
        assert "journal, fsync always" in status and "Records per fsync" in status
        metrics = c.get("/metrics").text
        assert "hive_relay_journal_failed 0.0" in metrics
        assert "hive_relay_journal_fsync_seconds_count" in metrics
        assert "hive_relay_journal_records_per_fsync_bucket" in metrics


def test_a_slow_fsync_stalls_no_reads_health_or_other_streams(tmp_path: Path) -> None:
    env = journal_env(tmp_path)
    with RelayProcess(env=env) as relay, httpx.Client(base_url=relay.url, timeout=30) as c:
        c.post("/v1/workspaces/b/envelopes", json={"before": 1})
    # From here every fsync takes three seconds.
    env["HIVE_RELAY_TEST_FSYNC_DELAY"] = "3"
    with RelayProcess(env=env) as relay, httpx.Client(base_url=relay.url, timeout=30) as c:
        answered = threading.Event()

        def slow_publish() -> None:
            with httpx.Client(base_url=relay.url, timeout=30) as pub:
                assert pub.post("/v1/workspaces/a/envelopes", json=1).status_code == 200
            answered.set()

        segment = list_segments(tmp_path)[-1][1]
        size = segment.stat().st_size
        t = threading.Thread(target=slow_publish)
        t.start()
        while segment.stat().st_size == size:  # its record is written; the fsync runs
            time.sleep(0.01)
        # While that publish waits on its fsync, the loop serves everything else.
        assert c.get("/v1/health").status_code == 200
        assert c.get("/v1/workspaces/b/envelopes").json()[0]["body"] == {"before": 1}
        with c.stream("GET", "/v1/workspaces/b/events", params={"after": 0}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        assert not answered.is_set(), "the fsync was not slow: the test proves nothing"
        t.join(30)
        assert answered.is_set()
        relay.stop(signal.SIGKILL)  # a graceful stop would wait on slow fsyncs too


def test_damage_stops_start_up_with_one_line_and_the_repair_flag_starts_it(
    tmp_path: Path,
) -> None:
    env = journal_env(tmp_path)
    relay = RelayProcess(env=env).start()
    with httpx.Client(base_url=relay.url) as c:
        seqs = [c.post("/v1/workspaces/d/envelopes", json={"i": i}).json()["seq"] for i in range(6)]
        epoch = c.get("/v1/workspaces/d/envelopes").headers["x-relay-epoch"]
    relay.stop(signal.SIGKILL)
    ((_, seg),) = list_segments(tmp_path)
    data = bytearray(seg.read_bytes())
    pos, starts = len(MAGIC), []
    while pos < len(data):
        starts.append(pos)
        pos += FRAME.size + FRAME.unpack_from(data, pos)[0]
    bad = starts[4]  # header, then the rows: the fourth row's record
    data[bad + FRAME.size + 3] ^= 0xFF
    seg.write_bytes(bytes(data))
    refused = RelayProcess(env=env, wait=False).start()
    assert refused.proc is not None and refused.proc.wait(20) == 2
    lines = [line for line in refused.logs().splitlines() if "hive-relay:" in line]
    assert len(lines) == 1 and seg.name in lines[0] and f"offset {bad}" in lines[0], lines
    assert "Traceback" not in refused.logs()
    with RelayProcess(env=env, args=["--journal-repair", "truncate"]) as repaired:
        r = httpx.get(repaired.url + "/v1/workspaces/d/envelopes")
        assert [row["seq"] for row in r.json()] == seqs[:3]
        assert r.headers["x-relay-epoch"] != epoch
