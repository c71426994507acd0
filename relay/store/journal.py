"""The memory store's write-ahead journal in HIVE_RELAY_DATA_DIR.

Files: `journal-<16 digits>.log` segments, numbered from 1. A segment is a magic
line, then records: a 4-byte length, the CRC-32 of the payload, the payload (a
msgpack array whose first item names the kind). The first record of every
segment is a header naming the epoch and the fsync mode of the run that wrote
it; the kinds after it are listed in `relay.store.memory` (`replay_record`).

Order: records are framed on the event loop, in the order the store changes,
and handed to one writer thread, which writes and syncs them. Each record has
a position (`lsn`, counted per run). The loop learns from the thread how far
records are safe: synced in `always` mode, written to the operating system in
`everysec` and `off`. That point is the store's *durable high-water mark*;
answers and readers wait for it (relay.store.memory, "Durability gate").

Group commit: while one fsync runs, new records queue; the next write and
fsync take all of them at once, so concurrent publishers share fsyncs.

Damage (scan): a last record cut short or unreadable is a torn tail (the
process died mid-write; nothing in it was acknowledged) and is cut off. Every
segment is fsynced when it is closed, in every mode, so only the last segment
can end torn; in a journal written before that rule, a torn non-last segment of
an `off` run (a machine crash) is handled at start-up as what `off` allows: the
records after the tear are dropped and the epoch changes. An
unreadable record before the end is damage: start-up stops unless the
operator asked for repair, which keeps what comes before it.

Failure: a failed write or fsync leaves the journal failed for the rest of the
process: the records it held are never acknowledged, no further write is
accepted (the page cache may no longer match the disk), /v1/health answers
503; reads go on. A restart replays what reached the disk.

Two environment variables exist for the tests only, never for operators:
HIVE_RELAY_TEST_FSYNC_DELAY (seconds each fsync is made to take longer) and
HIVE_RELAY_TEST_JOURNAL_TRACE (a file the writer appends "<segment> <offset>"
to after each sync returned, before any answer depending on it is released).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from relay.settings import SettingsError
from relay.store.base import StoreUnavailable

try:
    # zlib-ng's CRC-32 is the same checksum as zlib's (the format is unchanged),
    # several times faster on records of a KiB: with zlib's it was half of a
    # replay's scan, and it is paid on the loop by every publish's framing.
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib is the fallback
    from zlib import crc32

LOG = logging.getLogger("relay.journal")
MAGIC = b"HIVE-RELAY-JOURNAL 1\n"
FRAME = struct.Struct(">II")  # payload length, CRC-32 of the payload
MODES = ("always", "everysec", "off")
SEGMENT_RE = re.compile(r"journal-(\d{16})\.log")
# How long a failed journal asks clients to wait: it stays failed until a restart.
FAILED_RETRY_AFTER = 30

FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class JournalError(SettingsError):
    """The journal cannot be used as it is; start-up stops with this message."""


def segment_name(n: int) -> str:
    return f"journal-{n:016d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir():
        m = SEGMENT_RE.fullmatch(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


_ENCODER = msgspec.msgpack.Encoder()


def frame(record: tuple[Any, ...] | list[Any]) -> bytes:
    payload = _ENCODER.encode(record)
    return FRAME.pack(len(payload), crc32(payload)) + payload


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------- scanning
@dataclass
class Scan:
    """One segment read back: where its records end, and what is wrong after them.

    `records` is filled by scan_segment; read_segment streams the records
    instead (replay applies each as it is checked, never holding a segment's
    worth of decoded records) and fills in the rest once the stream ends."""

    path: Path
    records: list[list[Any]] = field(default_factory=list)
    good_end: int = 0  # offset just past the last whole record
    size: int = 0  # the file's size
    damage: str = ""  # "" (none), "torn" (the tail) or a description of mid-file damage
    damage_at: int = 0
    header: list[Any] | None = None  # the first record, when it is a segment header
    count: int = 0  # whole records
    last_kind: str = ""  # the kind of the last whole record ("c": a clean stop)


def scan_segment(path: Path) -> Scan:
    scan = Scan(path)
    scan.records = list(read_segment(scan))
    return scan


def read_segment(scan: Scan) -> Iterator[list[Any]]:
    """Yield the whole records of `scan.path`, checked, in order; once the
    iterator is done the scan says where they ended and what (if anything)
    followed them.

    The file is mapped rather than read: records are decoded straight from the
    page cache (no 64 MiB copy per segment), and each payload is checked with
    one CRC-32 and decoded with one msgspec call.
    """
    with open(scan.path, "rb") as f:
        size = scan.size = os.fstat(f.fileno()).st_size
        if size <= len(MAGIC):
            data = f.read()
            scan.size = len(data)
            if data == MAGIC:
                scan.good_end = len(MAGIC)
            elif MAGIC.startswith(data):  # cut short while the segment was being created
                scan.damage = "torn" if data else ""
            else:
                scan.damage = "not a hive-relay journal segment"
            return iter(())
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if mapped[: len(MAGIC)] != MAGIC:
        mapped.close()
        scan.damage = "not a hive-relay journal segment"
        return iter(())
    return _records(scan, mapped, size)


def _records(scan: Scan, mapped: mmap.mmap, size: int) -> Iterator[list[Any]]:
    view = memoryview(mapped)
    decode = msgspec.msgpack.Decoder().decode
    unpack = FRAME.unpack_from
    check = crc32
    head = FRAME.size
    pos = len(MAGIC)
    count = 0
    record: Any = None
    good: Any = None  # the last whole record
    payload = view[:0]
    try:
        while pos < size:
            if pos + head > size:
                scan.damage = "torn"
                break
            n, crc = unpack(view, pos)
            end = pos + head + n
            if end > size:
                scan.damage = "torn"
                break
            payload = view[pos + head : end]
            record = None
            if check(payload) == crc:
                try:
                    record = decode(payload)
                except msgspec.DecodeError:
                    record = None
            # A whole record passes its checksum and is a list (a kind and its fields).
            if type(record) is not list or not record:
                # The last record written in part before a crash, or (a machine
                # crash) blocks the file had been given whose data never reached
                # the disk.
                if end == size or view[pos:].tobytes().count(0) == size - pos:
                    scan.damage = "torn"
                else:
                    scan.damage = "a record fails its checksum"
                break
            if not count and record[0] == "h":
                scan.header = record
            count += 1
            pos = end
            good = record
            yield record
    finally:
        scan.good_end = pos
        scan.damage_at = pos
        scan.count = count
        if good is not None:
            scan.last_kind = str(good[0])
        # Decoded records hold copies; the map goes once no slice of it is left.
        payload.release()
        view.release()
        mapped.close()


# -------------------------------------------------------------------- writing
class _Rotate:
    __slots__ = ("header", "number")

    def __init__(self, number: int, header: bytes) -> None:
        self.number = number
        self.header = header


class _Histogram:
    """Observed from the writer thread, read at scrape time (a torn read is harmless)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0
        self.recent: list[float] = []  # the last few thousand, for the status page

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1
        self.recent.append(value)
        if len(self.recent) > 4096:
            del self.recent[:2048]

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    def quantile(self, q: float) -> float:
        values = sorted(self.recent)
        if not values:
            return 0.0
        return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class JournalStats:
    fsync_seconds: _Histogram = field(default_factory=lambda: _Histogram(FSYNC_BUCKETS))
    records_per_fsync: _Histogram = field(default_factory=lambda: _Histogram(BATCH_BUCKETS))
    writes: int = 0


class Journal:
    """The writer side: frames records on the loop, writes and syncs them in a thread."""

    def __init__(
        self,
        directory: Path,
        mode: str,
        segment_bytes: int,
        epoch: str,
        first_segment: int,
        existing_bytes: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"fsync mode {mode!r}; expected one of {MODES}")
        self.dir = directory
        self.mode = mode
        self.segment_bytes = segment_bytes
        self.epoch = epoch
        self.stats = JournalStats()
        self.failed: str | None = None  # why, once a write or fsync failed
        self.closing = False
        # Loop side.
        self.lsn = 0  # the last record handed over
        self.durable_lsn = 0  # the last record safe as the mode promises
        self.segment = first_segment
        self.segment_fill = 0  # bytes handed over into the current segment
        self.total_bytes = existing_bytes  # all live segments on disk (and queued)
        self.segment_sizes: dict[int, int] = {}
        self.on_durable: Any = None  # callable(lsn), set by the store
        # (lsn, future) per waiting caller, in lsn order. Each caller has its own
        # future, so one that is cancelled (a client that left) cancels only its
        # own; a shared future would need asyncio.shield, which costs two more
        # callbacks per caller when the round is released.
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shared with the thread, under _cond.
        self._cond = threading.Condition(threading.Lock())
        self._buf: list[bytes | _Rotate] = []
        self._buf_lsn = 0
        self._buf_rotates = False  # whether _buf holds a _Rotate (else only records)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._fd = -1
        self._fd_segment = first_segment
        self._dsync = bool(_RWF_DSYNC) and hasattr(os, "pwritev")  # see _sync
        self._delay = float(os.environ.get("HIVE_RELAY_TEST_FSYNC_DELAY", "0") or 0)
        self._trace = os.environ.get("HIVE_RELAY_TEST_JOURNAL_TRACE", "")
        self._open_segment_now(first_segment)

    # ------------------------------------------------------------ segments
    def _header(self, number: int) -> bytes:
        return frame(("h", number, self.epoch, self.mode, time.time()))

    def _open_segment_now(self, number: int) -> None:
        """Create segment `number` with its header, synced with its directory entry."""
        path = self.dir / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            data = MAGIC + self._header(number)
            _write_all(fd, data)
            os.fsync(fd)  # in every mode: see _write_batch
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self.segment_fill = len(data)
        self.total_bytes += len(data)
        self.segment_sizes[number] = len(data)

    # ----------------------------------------------------------- loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="relay-journal", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise StoreUnavailable when writes cannot be made durable (before any change)."""
        if self.failed is not None:
            raise StoreUnavailable(
                f"the relay's disk failed ({self.failed}); writes are refused until it "
                "is restarted",
                retry_after=FAILED_RETRY_AFTER,
            )
        if self.closing:
            raise StoreUnavailable("the relay is shutting down")

    def add(self, record: tuple[Any, ...]) -> int:
        """Hand one record to the writer; returns its position."""
        if self.failed is not None:
            return self.lsn  # nothing more reaches the disk; check() refuses writes
        data = frame(record)
        size = len(data)
        lsn = self.lsn = self.lsn + 1
        self.segment_fill += size
        self.total_bytes += size
        with self._cond:
            buf = self._buf
            buf.append(data)
            self._buf_lsn = lsn
            if len(buf) == 1:  # the writer took the last round (or is idle): wake it
                self._cond.notify()
        if self.segment_fill >= self.segment_bytes:
            self.rotate()
        return lsn

    def rotate(self) -> int:
        """Start a new segment: records handed over from now on go into it; returns its number."""
        # The closed segment's size is final (add() counts only segment_fill).
        self.segment_sizes[self.segment] = self.segment_fill
        self.segment += 1
        header = self._header(self.segment)
        size = len(MAGIC) + len(header)
        self.lsn += 1
        self.segment_fill = size
        self.total_bytes += size
        self.segment_sizes[self.segment] = size
        with self._cond:
            self._buf.append(_Rotate(self.segment, header))
            self._buf_lsn = self.lsn
            self._buf_rotates = True
            self._cond.notify()
        return self.segment

    def forget_segments_before(self, number: int) -> list[Path]:
        """The segment files a checkpoint covering everything before `number` frees."""
        self.segment_sizes[self.segment] = self.segment_fill
        out = []
        for n in sorted(self.segment_sizes):
            if n < number:
                self.total_bytes -= self.segment_sizes.pop(n)
                out.append(self.dir / segment_name(n))
        return out

    def wait(self, lsn: int) -> asyncio.Future[None] | None:
        """None when `lsn` is safe already; else a future of the caller's own,
        resolved when it is (or failed). Cancelling it affects no other caller."""
        if lsn <= self.durable_lsn:
            return None
        if self.failed is not None:
            self.check()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, fut))
        return fut

    async def wait_all(self) -> None:
        fut = self.wait(self.lsn)
        if fut is not None:
            await fut

    def _advance(self, lsn: int) -> None:
        if lsn <= self.durable_lsn:
            return
        self.durable_lsn = lsn
        if self.on_durable is not None:
            self.on_durable(lsn)
        waiters = self._waiters
        pop = waiters.popleft
        while waiters and waiters[0][0] <= lsn:
            fut = pop()[1]
            if not fut.done():  # a caller cancelled while it waited
                fut.set_result(None)

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            LOG.error(
                "the journal could not be written (%s): writes are refused until the relay "
                "is restarted; reads go on",
                reason,
            )
        waiters, self._waiters = self._waiters, deque()
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(
                    StoreUnavailable(
                        f"the relay's disk failed ({reason}); the write was not stored",
                        retry_after=FAILED_RETRY_AFTER,
                    )
                )

    async def close(self, clean: bool) -> None:
        """Stop the writer after everything handed over; a clean close leaves its marker."""
        if self.failed is None and clean and not self.closing:
            self.add(("c", time.time()))
        self.closing = True
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            thread = self._thread
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
            # The thread's last reports were scheduled before it ended; let them run.
            await asyncio.sleep(0)
        elif self.failed is None:
            self._flush_sync()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _flush_sync(self) -> None:
        """Write what is queued without a thread (a store that never started)."""
        with self._cond:
            batch, self._buf = self._buf, []
            upto = self._buf_lsn
            rotates, self._buf_rotates = self._buf_rotates, False
        try:
            self._write_batch(batch, rotates)
            if self.mode != "off":
                os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc.strerror or str(exc))
            return
        self._advance(upto)

    # --------------------------------------------------------- thread side
    def _report(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(fn, *args)

    def _write_batch(self, batch: list[bytes | _Rotate], rotates: bool = True) -> None:
        if not rotates:  # the common round: records only, one writev, no loop over them
            _writev_all(self._fd, batch)  # type: ignore[arg-type]
            self.stats.writes += 1
            return
        chunk: list[bytes] = []
        for item in batch:
            if isinstance(item, _Rotate):
                if chunk:
                    _writev_all(self._fd, chunk)
                    chunk = []
                # A segment is synced when it is closed, in every mode (`off`
                # included): only the last segment can then be torn by a machine
                # crash, and start-up cuts a torn tail there without repair.
                self._sync()
                self._switch(item)
            else:
                chunk.append(item)
        if chunk:
            _writev_all(self._fd, chunk)
        self.stats.writes += 1

    def _switch(self, rot: _Rotate) -> None:
        path = self.dir / segment_name(rot.number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _write_all(fd, MAGIC + rot.header)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd
        self._fd_segment = rot.number

    def _sync(self, chunks: list[bytes] | None = None) -> None:
        """fsync the segment; or, given `chunks` (a round of records in `always`
        mode), write them and sync their data in one call: pwritev with
        RWF_DSYNC, the per-call O_DSYNC (what fdatasync makes durable: the data
        and the file size that finds it). One system call, and one wait for the
        GIL afterwards, per round instead of two."""
        started = time.perf_counter()
        if chunks is None:
            if self._delay:
                time.sleep(self._delay)
            os.fsync(self._fd)
        else:
            _writev_all(self._fd, chunks, _RWF_DSYNC)
            self.stats.writes += 1
            if self._delay:  # the records are in the file; their sync is "slow"
                time.sleep(self._delay)
        self.stats.fsync_seconds.observe(time.perf_counter() - started)

    def _write_and_sync(self, batch: list[bytes | _Rotate], rotates: bool) -> None:
        """An `always` round: on disk when this returns."""
        if self._dsync and not rotates:
            try:
                self._sync(batch)  # type: ignore[arg-type]
                return
            except OSError as exc:
                # Flags the kernel or filesystem does not take fail before any
                # byte is written: fall back to writev and fsync from now on.
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dsync = False
        self._write_batch(batch, rotates)
        self._sync()

    def _trace_sync(self) -> None:
        if self._trace:
            where = os.lseek(self._fd, 0, os.SEEK_END)
            with open(self._trace, "a") as f:
                f.write(f"{self._fd_segment} {where}\n")

    def _run(self) -> None:
        cond = self._cond
        written = 0  # lsn written to the OS
        synced_at = time.monotonic()
        unsynced = 0  # records written since the last fsync
        while True:
            with cond:
                while not self._buf and not self._stop:
                    if self.mode == "everysec" and unsynced:
                        left = 1.0 - (time.monotonic() - synced_at)
                        if left <= 0:
                            break
                        cond.wait(left)
                    else:
                        cond.wait()
                batch, self._buf = self._buf, []
                upto = self._buf_lsn
                rotates, self._buf_rotates = self._buf_rotates, False
                stopping = self._stop
            try:
                if batch and self.mode == "always":
                    self._write_and_sync(batch, rotates)
                    self.stats.records_per_fsync.observe(upto - written)
                    written = upto
                    self._trace_sync()
                elif batch:
                    self._write_batch(batch, rotates)
                    unsynced += upto - written
                    written = upto
                # (`always` leaves nothing unsynced: each round was synced above.)
                if (
                    self.mode == "everysec"
                    and unsynced
                    and (stopping or time.monotonic() - synced_at >= 1.0)
                ):
                    self._sync()
                    self.stats.records_per_fsync.observe(unsynced)
                    unsynced = 0
                    synced_at = time.monotonic()
                    self._trace_sync()
                elif self.mode == "off" and stopping and unsynced:
                    os.fsync(self._fd)  # a clean stop leaves the journal on disk
                    unsynced = 0
            except OSError as exc:
                self._report(self._fail, exc.strerror or str(exc))
                return
            except Exception as exc:
                # A bug, not the disk: still never leave publishers waiting forever.
                LOG.exception("the journal writer stopped")
                self._report(self._fail, f"the journal writer stopped: {exc!r}")
                return
            if batch:
                self._report(self._advance, upto)
            if stopping:
                return


IOV_MAX = 1024  # Linux's limit of buffers per writev


# pwritev's flag for a write that returns once its data is durable (Linux 4.7+).
_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)


def _writev_all(fd: int, chunks: list[bytes], flags: int = 0) -> None:
    """Write every chunk in order: the records of one round, with no join (and no
    copy under the GIL); writev releases the GIL like write. With `flags`
    (RWF_DSYNC), pwritev at the file's own position (offset -1; the segment is
    opened O_APPEND), synced as it writes."""
    i = 0
    while i < len(chunks):
        group = chunks[i : i + IOV_MAX] if i or len(chunks) > IOV_MAX else chunks
        want = sum(map(len, group))
        done = os.pwritev(fd, group, -1, flags) if flags else os.writev(fd, group)
        if done < want:  # a short write: finish this group the simple way
            _write_all(fd, b"".join(group)[done:])
            if flags:
                os.fsync(fd)
        i += IOV_MAX


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def journal_metrics(journal: Journal) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "hive_relay_journal_bytes",
        "Bytes of journal segments not yet covered by a snapshot",
        value=journal.total_bytes,
    )
    stats = journal.stats
    fs = stats.fsync_seconds
    hist = HistogramMetricFamily("hive_relay_journal_fsync_seconds", "Time one journal fsync took")
    hist.add_metric([], fs.buckets(), fs.total)
    yield hist
    rp = stats.records_per_fsync
    batch = HistogramMetricFamily(
        "hive_relay_journal_records_per_fsync",
        "Journal records one fsync made durable (group commit)",
    )
    batch.add_metric([], rp.buckets(), rp.total)
    yield batch
    yield CounterMetricFamily(
        "hive_relay_journal_records", "Journal records written", value=journal.lsn
    )
    yield GaugeMetricFamily(
        "hive_relay_journal_failed",
        "1 once a journal write or fsync failed (writes refused until restart)",
        value=1 if journal.failed else 0,
    )
