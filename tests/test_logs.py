"""relay/logs.py in-process: the access line's own formatting and the buffered writer."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import logs


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("relay.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = fields
    return record


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield out
    if logs._writer is not None:
        logs._writer.close()
    logs._writer = None
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_line_matches_the_formatter_of_a_record(configured: io.StringIO, fmt: str) -> None:
    logs.configure(fmt, "info", configured)
    logs.access("GET", "/v1/workspaces/{ws}/envelopes", 200, 0.0123456, '1.2.3.4"x')
    assert logs._writer is not None
    logs._writer.flush()
    line = configured.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    fields = {
        "method": "GET",
        "route": "/v1/workspaces/{ws}/envelopes",
        "status": 200,
        "ms": 12.35,
        "client": '1.2.3.4"x',
    }
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter()
    expected = formatter.format(_record(**fields))
    if fmt == "json":
        got, want = json.loads(line), json.loads(expected)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got.pop("ts"))
        want.pop("ts")
        assert got == want
        assert list(json.loads(line)) == list(json.loads(expected))  # same field order
    else:
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
        assert re.fullmatch(stamp + " ", line[:24])
        assert line[24:-1] == expected[24:]


def test_warning_follows_the_access_lines_buffered_before_it(configured: io.StringIO) -> None:
    logs.configure("text", "info", configured)
    assert logs._writer is not None
    logs._writer.interval = 3600.0  # only the write of the warning may flush
    logs.access("GET", "/a", 200, 0.001, "c")
    logs.access("GET", "/b", 200, 0.001, "c")
    logging.getLogger("relay").warning("something odd")
    lines = configured.getvalue().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "relay.access request method=GET route=/a status=200 ms=1.0 client=c",
        "relay.access request method=GET route=/b status=200 ms=1.0 client=c",
        "relay something odd",
    ]


def test_access_lines_off_below_info(configured: io.StringIO) -> None:
    logs.configure("text", "warning", configured)
    logs.access("GET", "/a", 200, 0.001, "c")
    assert logs._writer is not None
    logs._writer.flush()
    assert configured.getvalue() == ""


def test_pending_lines_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    writer = logs.LineWriter(out, interval=3600.0)
    monkeypatch.setattr(logs, "MAX_PENDING", 5)
    for i in range(6):
        writer.buffer(f"{i}\n")
    assert out.getvalue() == "".join(f"{i}\n" for i in range(6))
    assert not writer.pending
    writer.close()


def test_the_thread_writes_lines_buffered_outside_a_loop() -> None:
    out = io.StringIO()
    writer = logs.LineWriter(out, interval=3600.0, backstop=0.01, on_loop=True)
    writer.buffer("one\n")
    for _ in range(500):  # the thread writes it within its interval; wait generously
        if out.getvalue():
            break
        writer._closed.wait(0.01)
    assert out.getvalue() == "one\n"
    writer.close()


def test_ms_field_prints_as_the_rounded_float(configured: io.StringIO) -> None:
    """The line's ms is counted as an int (round() and a float's repr were most of its
    cost); it reads as repr(round(duration * 1000, 2)) did, but on an exact half."""
    logs.configure("text", "info", configured)
    durations = [0.0, 1e-5, 0.0000123, 0.00099, 0.001, 0.0099949, 0.01, 0.0123456, 0.1]
    durations += [1.5, 12.0, 3600.123, 86400.0]
    durations += [k / 997 * 0.013 for k in range(400)]  # both sides of the 10 ms table
    kept = [d for d in durations if abs((d * 1e5) % 1 - 0.5) > 1e-6]
    for d in kept:
        logs.access("GET", "/a", 200, d, "c")
    assert logs._writer is not None
    logs._writer.flush()
    got = [line.split(" ms=")[1].split(" ")[0] for line in configured.getvalue().splitlines()]
    assert got == [repr(round(d * 1000, 2)) for d in kept]


def test_writer_drains_in_order_and_keeps_lines_added_after() -> None:
    out = io.StringIO()
    writer = logs.LineWriter(out, interval=3600.0)
    for i in range(3):
        writer.buffer(f"{i}\n")
    writer.write_now("now\n")
    writer.buffer("3\n")
    assert out.getvalue() == "0\n1\n2\nnow\n"
    writer.close()
    assert out.getvalue() == "0\n1\n2\nnow\n3\n"


def test_the_loop_writes_its_lines_within_the_interval() -> None:
    """In an event loop the first line into an empty buffer sets a timer there: the
    writer thread (here asleep for an hour) is not needed. A timer set on a loop that
    stopped before it ran leaves its lines to the thread (here a flush) and does not
    keep the next loop from setting its own."""
    out = io.StringIO()
    writer = logs.LineWriter(out, interval=0.01, backstop=3600.0, on_loop=True)

    async def lines(first: int) -> str:
        writer.buffer(f"{first}\n")
        writer.buffer(f"{first + 1}\n")
        for _ in range(500):
            if out.getvalue().endswith(f"{first + 1}\n"):
                break
            await asyncio.sleep(0.01)
        return out.getvalue()

    async def stops_before_its_timer() -> None:
        writer.buffer("lost to no one\n")

    assert asyncio.run(lines(0)) == "0\n1\n"
    asyncio.run(stops_before_its_timer())
    writer.flush()
    assert asyncio.run(lines(2)) == "0\n1\nlost to no one\n2\n3\n"
    writer.close()


def test_the_loop_writes_only_to_a_regular_file(tmp_path: Path) -> None:
    """A log file is written from the loop; a pipe (journald, a container's log driver)
    only from the thread, so a reader that stops reading never stalls the loop."""
    with open(tmp_path / "relay.log", "w") as f:
        writer = logs.LineWriter(f)
        assert writer.on_loop
        writer.close()
    assert not logs.LineWriter(io.StringIO()).on_loop
    r, w = os.pipe()
    os.set_blocking(w, True)
    out = os.fdopen(w, "w")
    writer = logs.LineWriter(out, interval=0.01)
    assert not writer.on_loop
    done = threading.Event()

    async def serve() -> None:
        # More than a pipe holds, in lines buffered as access lines are; nobody reads.
        for i in range(2000):
            writer.buffer(f"{i:0100d}\n")
        for _ in range(10):
            await asyncio.sleep(0.02)  # each turn of the loop would run its timer
        done.set()

    loop_thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    loop_thread.start()
    finished = done.wait(30)
    read = b""
    while b"1999\n" not in read:  # now the reader reads: everything arrives, in order
        assert select.select([r], [], [], 30)[0], "the writer thread never wrote the rest"
        read += os.read(r, 1 << 16)
    writer.close()
    out.close()
    os.close(r)
    assert finished, "the event loop waited on a pipe nobody read"
    assert read.decode().split() == [f"{i:0100d}" for i in range(2000)]


def test_a_forked_worker_neither_waits_on_the_parents_lock_nor_repeats_its_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor forks workers, which configure their own log: a fork while the
    parent's writer held its lock must not leave the child waiting for ever, and a
    line the parent had pending is written once, by the parent."""
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    writer = logs.LineWriter(out, interval=3600.0)
    monkeypatch.setattr(logs, "_writer", writer)
    writer.buffer("parent's line\n")
    with writer._lock:  # as if the writer thread were writing at the fork
        pid = os.fork()
        if pid == 0:  # the worker: what configure does to the writer it inherited
            try:
                logs._writer.close()
                os.write(w, b"child done\n")
            finally:
                os._exit(0)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked worker waited on the parent's log lock")
        time.sleep(0.01)
    writer.close()
    out.close()
    text = b""
    while chunk := os.read(r, 1 << 16):
        text += chunk
    os.close(r)
    assert text.decode().splitlines() == ["child done", "parent's line"]


def test_a_line_logged_from_inside_a_write_waits_for_the_next_write() -> None:
    """A signal handler runs between two bytecodes of the main thread, and the relay's
    SIGTERM handler logs: arriving while that thread writes buffered lines (the loop's
    timer), its line must neither wait for ever on the writer's lock (a relay that
    never stopped on SIGTERM) nor land inside the write; it goes out next, in order."""

    class Interrupted(io.StringIO):
        interrupted = False

        def write(self, text: str) -> int:
            if not self.interrupted:
                self.interrupted = True
                writer.write_now("signal: stopping\n")  # as the handler's LOG.info does
            return super().write(text)

    out = Interrupted()
    writer = logs.LineWriter(out, interval=3600.0, on_loop=True)
    writer.buffer("one\n")
    writer.buffer("two\n")
    flushing = threading.Thread(target=writer.flush, daemon=True)
    flushing.start()
    flushing.join(10)
    assert not flushing.is_alive(), "a line logged inside a write waited on the writer for ever"
    assert out.getvalue() == "one\ntwo\n"
    writer.flush()
    assert out.getvalue() == "one\ntwo\nsignal: stopping\n"
    writer.close()
