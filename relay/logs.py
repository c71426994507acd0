"""Logging set-up: one line per request, as text or JSON. Never bodies or tokens;
the route template is logged, not the path, so workspace ids stay out of logs.

Access lines do not go through the logging machinery: `access` formats the line
itself (a LogRecord, the filters and the formatter cost as much as the rest of a
cached read) and hands it to `LineWriter`, which writes what is pending in one
write FLUSH_INTERVAL seconds after the first of them. When the log is a regular
file that write is made from the event loop that buffered the lines (a timer: no
thread to wake and no hand-off of the interpreter lock, which cost a cached read
more than the line itself), and a thread of its own writes, every
BACKSTOP_INTERVAL, what no loop will: lines buffered outside a loop, or while the
loop is stuck. When the log is a pipe, socket or terminal (journald, a container's
log driver), which can stall while its reader does, the thread writes every
FLUSH_INTERVAL and the loop never waits on it. Every other record (warnings,
errors, start-up lines) is written at once, after the access lines pending before
it, so the log stays in order. A crash or SIGKILL loses at most the access lines
of the last FLUSH_INTERVAL (plus however late the loop runs its timer or the
thread gets the interpreter lock; BACKSTOP_INTERVAL if the loop is stuck); a
clean exit loses none.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import stat
import sys
import threading
import time
from collections import deque
from contextvars import ContextVar
from itertools import chain, islice
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, TextIO

ACCESS = logging.getLogger("relay.access")
LOG = logging.getLogger("relay")

# Seconds from the first buffered access line to their write: what a SIGKILL may lose.
FLUSH_INTERVAL = 0.05
# Seconds between the writer thread's looks, for lines no event loop will write.
BACKSTOP_INTERVAL = 0.25
# Past this many pending lines (the timer late, or the log's reader stalled)
# `access` writes them itself (checked once a millisecond, see _direct): memory
# stays bounded and the relay waits for its log as it did before there was a buffer.
MAX_PENDING = 10_000

# Set in the task serving one request when the relay ends an SSE answer without its
# last chunk because the peer stopped reading (relay/api/live.py). uvicorn then
# reports that answer as incomplete, at ERROR; for such a task that line is dropped:
# the peer is gone, the relay is not at fault, and it has logged at debug already.
STREAM_ABANDONED: ContextVar[bool] = ContextVar("hive_relay_stream_abandoned", default=False)
_INCOMPLETE = "ASGI callable returned without completing response."


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class _DropPathLines(logging.Filter):
    """uvicorn logs WebSocket hand-shakes with the full path (a workspace id);
    our request log already has one line per session, with the route template."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (
            msg.startswith('%s - "WebSocket')
            or msg in ("connection open", "connection closed")
            # The websockets library's debug lines: hand-shake headers (tokens) and frames.
            or (record.levelno <= logging.DEBUG and msg.startswith(("< ", "> ", "= ", "! ")))
            # Runs in the logging caller's context: the task of that one answer.
            or (msg == _INCOMPLETE and STREAM_ABANDONED.get())
        )


def _never_waits(stream: TextIO) -> bool:
    """Whether `stream` is a regular file: a write there never waits for a reader."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return False


class LineWriter:
    """Lines to a stream: buffered ones within FLUSH_INTERVAL, the others at once.

    `pending` is a deque: the event loop appends, the loop's timer or the writer
    thread pops, both atomic without a lock. The lock orders writes: a line written
    at once goes out after every line buffered before it.
    """

    def __init__(
        self,
        stream: TextIO,
        interval: float = FLUSH_INTERVAL,
        backstop: float = BACKSTOP_INTERVAL,
        on_loop: bool | None = None,
    ) -> None:
        self.stream = stream
        self.interval = interval
        # The loop writes only to a regular file, which takes a write at once (the
        # page cache). A pipe, socket or terminal (journald, a container's log
        # driver, a shell) can stall while its reader does: the loop must never
        # wait on it, so the thread writes those every `interval`, as before.
        self.on_loop = _never_waits(stream) if on_loop is None else on_loop
        self.backstop = backstop if self.on_loop else interval
        # Each entry is a line in pieces (an access line is four strings that
        # outlive it: see `access`), joined in one pass when written.
        self.pending: deque[tuple[str, ...]] = deque()
        self._lock = threading.RLock()
        self._writing = False  # the lock's holder is in _drain (see there)
        self._closed = threading.Event()
        self._armed: asyncio.AbstractEventLoop | None = None  # the loop whose timer is set
        self._thread = threading.Thread(target=self._run, name="relay-log", daemon=True)
        self._thread.start()

    def buffer(self, line: str) -> None:
        if not self.pending:
            self.arm()
        self.pending.append((line,))
        if len(self.pending) > MAX_PENDING:
            self.flush()

    def arm(self) -> None:
        """Before a line goes into an empty buffer: have the running event loop write
        it within `interval`. Without a running loop the writer thread will."""
        if not self.on_loop:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._armed is not loop:  # a timer set on a loop since stopped never runs
            self._armed = loop
            loop.call_later(self.interval, self._on_timer)

    def _on_timer(self) -> None:
        self._armed = None
        self.flush()

    def write_now(self, line: str) -> None:
        with self._lock:
            if self._writing:  # see _drain: this thread is in the middle of a write
                self.pending.append((line,))
                self.arm()
                return
            self._drain(line)

    def flush(self) -> None:
        with self._lock:
            if not self._writing:
                self._drain("")

    def _drain(self, last: str) -> None:
        # A signal handler runs between two bytecodes of the main thread, so it may
        # log (uvicorn's "Shutting down", the relay's own lines) while that thread
        # is here, holding the lock: the lock is re-entrant, and a line written from
        # inside a write waits in `pending` for the next one instead of waiting on
        # this thread for ever (or writing into the middle of this write).
        self._writing = True
        try:
            self._write_pending(last)
        finally:
            self._writing = False

    def _write_pending(self, last: str) -> None:
        pending = self.pending
        # The lines pending now, popped in C: only the writer pops (under the lock), so
        # the deque holds at least this many; lines appended meanwhile wait for the next.
        text = "".join(chain.from_iterable(islice(iter(pending.popleft, None), len(pending))))
        text += last
        if text:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # the log's reader is gone; the relay keeps serving

    def _run(self) -> None:
        while not self._closed.wait(self.backstop):
            if self.pending:
                self.flush()

    def close(self) -> None:
        self._closed.set()
        self.flush()


class _WriterHandler(logging.Handler):
    """Every record that is not an access line: written at once, in order."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write_now(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        # logging.shutdown() calls this: a worker process that leaves by os._exit (no
        # atexit) still writes the access lines it buffered.
        self.writer.flush()


class _Stamp:
    """The time stamp of a log line as the formatters write it: the part up to the
    second, renewed once a second, and the milliseconds' table."""

    def __init__(self, json_format: bool) -> None:
        self.json = json_format
        self.second = -1
        self.prefix = ""
        self.millis = _MILLIS_JSON if json_format else _MILLIS_TEXT

    def renew(self, second: int) -> None:
        self.second = second
        if self.json:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        else:
            self.prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


# The milliseconds of a time stamp, as the formatters print them.
_MILLIS_TEXT = tuple(f",{ms:03d}" for ms in range(1000))
_MILLIS_JSON = tuple(f".{ms:03d}Z" for ms in range(1000))
# The "ms" field is round(duration * 1000, 2) as Python prints that float: whole
# hundredths of a millisecond, trailing zeros dropped ("12.5", "3.0"). Counted as an
# int and taken from these tables (below 10 ms, from the first): round() and the
# float's repr cost more than the rest of the line did (callgrind).
_CENTS = tuple(f".{c:02d}".rstrip("0") if c else ".0" for c in range(100))
_MS = tuple(f"{h // 100}{_CENTS[h % 100]}" for h in range(1000))


_writer: LineWriter | None = None
_json = False
_stamp = _Stamp(False)
# The middle of the line for each (method, route, status) seen, in the format in force.
_middles: dict[tuple[str, str, int], str] = {}
MAX_MIDDLES = 1024
# The end of the line for each client address seen, in the format in force.
_tails: dict[str, str] = {}
MAX_TAILS = 4096
# The millisecond the start of the line (`_head`, up to the end of the time stamp) is for.
_tick = -1
_head = ""
# The buffer access lines go to in the millisecond `_tick` (see _direct).
_lines: deque[tuple[str, ...]] | None = None
# time.time() - time.perf_counter(), as `access` last read it.
_offset = 0.0


def _after_fork_in_child() -> None:
    """A worker forked by the supervisor (relay/__main__.py) gets a copy of the
    writer: its lock as it was at the fork (held, if the parent's thread was writing
    then: the child's `configure` would wait on it for ever) and the parent's
    pending lines (the parent writes those; the child must not write them twice)."""
    writer = _writer
    if writer is not None:
        writer._lock = threading.RLock()
        writer._writing = False
        writer.pending.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def configure(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Log to `stream` (standard error by default) in format `fmt` from `level` up."""
    global _writer, _json, _stamp, _tick
    if _writer is not None:
        _writer.close()
    _writer = LineWriter(stream or sys.stderr)
    atexit.register(_writer.close)
    _json = fmt == "json"
    _stamp = _Stamp(_json)
    _tick = -1
    _middles.clear()
    _tails.clear()
    handler = _WriterHandler(_writer)
    handler.setFormatter(JsonFormatter() if _json else TextFormatter())
    handler.addFilter(_DropPathLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log prints paths (workspace ids); ours prints route templates.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def access(
    method: str, route: str, status: int, duration: float, client: str, end: float | None = None
) -> None:
    """One request's line: method, route template, status, milliseconds, client.
    `end` is the `time.perf_counter()` the duration ended at, if the caller has it:
    the line's time stamp is then that plus the wall clock's offset from it (read
    once a millisecond), not another reading of the clock."""
    # This runs for every request: the line is four strings kept between requests
    # (the time stamp's, renewed once a millisecond; the fields from the method to
    # "ms=", once per method, route and status; the client's, once per address)
    # and the duration from a table (see _MS), half a hundredth of a ms rounded up.
    # What the line goes to is looked at once a millisecond too (`_direct`).
    global _tick, _head, _lines, _offset
    if end is None:
        end = time.perf_counter()
    now = end + _offset
    tick = int(now * 1000)
    if tick != _tick:
        _offset = time.time() - time.perf_counter()
        now = end + _offset
        _tick = tick = int(now * 1000)
        _lines = _direct()
        if _lines is not None:
            _head = _stamp_head(tick)
    lines = _lines
    if lines is None:
        _record(method, route, status, duration, client)
        return
    hundredths = int(duration * 100_000 + 0.5)
    ms = _MS[hundredths] if hundredths < 1000 else f"{hundredths // 100}{_CENTS[hundredths % 100]}"
    middle = _middles.get((method, route, status))
    if middle is None:
        middle = _middle((method, route, status))
    tail = _tails.get(client)
    if tail is None:
        tail = _tail(client)
    if not lines:
        _writer.arm()  # type: ignore[union-attr]  # set whenever _lines is
    lines.append((_head, middle, ms, tail))


def _direct() -> deque[tuple[str, ...]] | None:
    """Where access lines go this millisecond: the writer's buffer when `configure`
    set the log up and the relay.access logger is as it left it, at INFO;
    otherwise None (the app embedded elsewhere, tests: a record, see _record)."""
    writer = _writer
    if writer is None or ACCESS.handlers or not ACCESS.propagate:
        return None
    if not ACCESS.isEnabledFor(logging.INFO):
        return None
    if len(writer.pending) > MAX_PENDING:
        # The timer is late or the log's reader stalled: write them now, so memory
        # stays bounded (at most this many plus a millisecond's lines) and the relay
        # waits for its log as it did before there was a buffer.
        writer.flush()
    return writer.pending


def _record(method: str, route: str, status: int, duration: float, client: str) -> None:
    ACCESS.info(
        "request",
        extra={
            "fields": {
                "method": method,
                "route": route,
                "status": status,
                "ms": round(duration * 1000, 2),
                "client": client,
            }
        },
    )


def _stamp_head(tick: int) -> str:
    """The start of an access line up to the end of its time stamp, for the
    millisecond `tick` (since the epoch)."""
    stamp = _stamp
    second, millis = divmod(tick, 1000)
    if second != stamp.second:
        stamp.renew(second)
    if _json:
        return f'{{"ts":"{stamp.prefix}{stamp.millis[millis]}'
    return f"{stamp.prefix}{stamp.millis[millis]}"


def _tail(client: str) -> str:
    """The end of an access line: the client field and the newline."""
    tail = f',"client":{_json_str(client)}}}\n' if _json else f" client={client}\n"
    # A client's address is the peer's or, behind a trusted proxy, a header's: bounded.
    if len(_tails) >= MAX_TAILS:
        _tails.clear()
    _tails[client] = tail
    return tail


def _middle(key: tuple[str, str, int]) -> str:
    """The part of an access line from after the time stamp to the ms field's value."""
    method, route, status = key
    if _json:
        middle = (
            f'","level":"info","logger":"relay.access","msg":"request",'
            f'"method":{_json_str(method)},"route":{_json_str(route)},"status":{status},"ms":'
        )
    else:
        middle = f" INFO relay.access request method={method} route={route} status={status} ms="
    # Routes are templates and statuses few, but a client picks the method: bounded.
    if len(_middles) < MAX_MIDDLES:
        _middles[key] = middle
    return middle
