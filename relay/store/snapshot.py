"""Atomic snapshots of the memory store in HIVE_RELAY_DATA_DIR.

File layout: a magic line, then length-prefixed msgpack records (a header, one
record per workspace followed by its rows in chunks, the pairing codes), then an
end record carrying the SHA-256 of everything before it. A file that is not
ours, truncated or altered fails loudly at start-up instead of starting empty.

Writing: a consistent copy is taken on the event loop (list copies of
references, cheap), then encoded chunk by chunk and written from a worker
thread, so the loop is never held for more than one chunk's encoding. The
file is written to a temporary name, fsynced and renamed over the old one, and
the directory is fsynced: a crash at any point leaves the previous snapshot.

Epoch: the header says whether the snapshot was written by a clean shutdown.
Restoring a clean one keeps the epoch; restoring a periodic one (the relay
died after it) starts a new epoch, because envelopes acknowledged after the
snapshot may be lost, and clients must be told.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from relay.settings import SettingsError
from relay.store.base import StoreUnavailable, new_epoch
from relay.store.journal import (
    MAGIC,
    Journal,
    JournalError,
    Scan,
    list_segments,
    read_segment,
    segment_name,
)
from relay.store.memory import MemoryStore, WorkspaceState

LOG = logging.getLogger("relay.snapshot")
SNAPSHOT_MAGIC = b"HIVE-RELAY-SNAPSHOT\n"
FORMAT_VERSION = 1
FILENAME = "relay.snapshot"
CHUNK_ROWS = 512
_LEN = struct.Struct(">I")


class SnapshotError(SettingsError):
    """The snapshot cannot be used; start-up stops with this message."""


def _records(
    header: dict[str, Any],
    workspaces: list[WorkspaceState],
    pairs: list[tuple[str, str, float]],
) -> Iterator[dict[str, Any]]:
    yield header
    for w in workspaces:
        yield {
            "t": "ws",
            "name": w.name,
            "head": w.head,
            "dropped": w.dropped,
            "rows": len(w.rows),
            "keyring": w.keyring,
            "presence": w.presence,
            "candidates": w.candidates,
        }
        for i in range(0, len(w.rows), CHUNK_ROWS):
            yield {
                "t": "rows",
                "seqs": w.seqs[i : i + CHUNK_ROWS],
                "rows": w.rows[i : i + CHUNK_ROWS],
                "keys": w.keys[i : i + CHUNK_ROWS],
            }
    yield {"t": "pairs", "pairs": pairs}


def write_snapshot(
    path: Path,
    header: dict[str, Any],
    workspaces: list[WorkspaceState],
    pairs: list[tuple[str, str, float]],
) -> int:
    """Write atomically; returns the file size. Runs in a worker thread."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    encoder = msgspec.msgpack.Encoder()
    with open(tmp, "wb") as f:
        f.write(SNAPSHOT_MAGIC)
        digest.update(SNAPSHOT_MAGIC)
        size += len(SNAPSHOT_MAGIC)
        for record in _records(header, workspaces, pairs):
            payload = encoder.encode(record)
            framed = _LEN.pack(len(payload)) + payload
            f.write(framed)
            digest.update(framed)
            size += len(framed)
        end = encoder.encode({"t": "end", "sha256": digest.hexdigest()})
        f.write(_LEN.pack(len(end)) + end)
        size += 4 + len(end)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def read_snapshot(
    path: Path,
) -> tuple[dict[str, Any], list[WorkspaceState], list[tuple[str, str, float]]]:
    data = path.read_bytes()
    where = f"snapshot {str(path)!r}"
    if not data.startswith(SNAPSHOT_MAGIC):
        raise SnapshotError(
            f"HIVE_RELAY_DATA_DIR: {where} is not a hive-relay snapshot; move it away "
            "or point HIVE_RELAY_DATA_DIR elsewhere"
        )
    decoder = msgspec.msgpack.Decoder()
    pos = len(SNAPSHOT_MAGIC)
    records: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    try:
        while pos < len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + 4 + n > len(data):
                raise ValueError("truncated record")
            record = decoder.decode(data[pos + 4 : pos + 4 + n])
            if record.get("t") == "end":
                if hashlib.sha256(data[:pos]).hexdigest() != record.get("sha256"):
                    raise ValueError("checksum mismatch")
                end = record
                pos += 4 + n
                break
            records.append(record)
            pos += 4 + n
    except (ValueError, struct.error, msgspec.DecodeError, AttributeError) as exc:
        raise SnapshotError(
            f"HIVE_RELAY_DATA_DIR: {where} is corrupt ({exc}); restore a backup or move it "
            "away to start empty"
        ) from None
    if end is None or pos != len(data):
        raise SnapshotError(
            f"HIVE_RELAY_DATA_DIR: {where} is incomplete or has trailing data; restore a "
            "backup or move it away to start empty"
        )
    header = records[0] if records else {}
    if header.get("format") != "hive-relay-snapshot":
        raise SnapshotError(f"HIVE_RELAY_DATA_DIR: {where} has no hive-relay header")
    if header.get("version") != FORMAT_VERSION:
        raise SnapshotError(
            f"HIVE_RELAY_DATA_DIR: {where} has format version {header.get('version')}; "
            f"this relay reads version {FORMAT_VERSION}"
        )
    workspaces: list[WorkspaceState] = []
    pairs: list[tuple[str, str, float]] = []
    current: WorkspaceState | None = None
    for record in records[1:]:
        kind = record.get("t")
        if kind == "ws":
            current = WorkspaceState(
                name=record["name"],
                head=record["head"],
                dropped=record["dropped"],
                seqs=[],
                rows=[],
                keys=[],
                keyring=list(record["keyring"]),
                presence=[tuple(p) for p in record["presence"]],
                candidates=[tuple(p) for p in record["candidates"]],
            )
            workspaces.append(current)
        elif kind == "rows" and current is not None:
            current.seqs += record["seqs"]
            current.rows += record["rows"]
            current.keys += record["keys"]
        elif kind == "pairs":
            pairs = [tuple(p) for p in record["pairs"]]
    return header, workspaces, pairs


@dataclass(frozen=True)
class JournalConfig:
    mode: str = "always"
    repair: str = "off"
    segment_bytes: int = 64 << 20
    max_bytes: int = 1 << 30
    max_age: float = 3600.0


class Snapshotter:
    """Snapshots, and with a journal, checkpoints: each snapshot names the first
    journal segment it does not cover (`journal_next`); start-up loads the
    snapshot and replays the segments from there; a written snapshot removes the
    segments it covers."""

    def __init__(
        self,
        store: MemoryStore,
        data_dir: str,
        interval: float,
        journal: JournalConfig | None = None,
    ) -> None:
        self.store = store
        self.dir = Path(data_dir)
        self.path = self.dir / FILENAME
        self.interval = interval
        self.config = journal
        self.journal: Journal | None = None
        self._written_version = -1
        self._written_at = time.monotonic()
        self._written_lsn = 0
        self.last_write_seconds = 0.0
        self.last_size = 0
        self.replayed = 0
        self.replay_seconds = 0.0
        self._lock = anyio.Lock()

    def restore(self) -> None:
        """Load the snapshot, if any. Raises SnapshotError (start-up stops) when unusable."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SnapshotError(
                f"HIVE_RELAY_DATA_DIR: {str(self.dir)!r} is not a writable directory "
                f"({exc.strerror or exc})"
            ) from None
        for stale in self.dir.glob(f"{FILENAME}.tmp-*"):
            stale.unlink(missing_ok=True)
        header: dict[str, Any] | None = None
        if self.path.exists():
            started = time.perf_counter()
            header, workspaces, pairs = read_snapshot(self.path)
            self.store.import_state(iter(workspaces), pairs)
            stats = self.store.stats_now()
            LOG.info(
                "restored snapshot: %d workspaces, %d envelopes in %.2f s",
                stats.workspaces,
                stats.envelopes,
                time.perf_counter() - started,
            )
        if self.config is not None:
            # Replay allocates millions of objects that all live on: the cyclic
            # collector would walk them again and again for nothing.
            gc_was = gc.isenabled()
            gc.disable()
            try:
                epoch = self._replay_journal(header)
            finally:
                if gc_was:
                    gc.enable()
        elif header is None:
            epoch = self.store.epoch
            LOG.info("no snapshot yet in the data dir; starting empty with epoch %s", epoch)
        elif header.get("clean"):
            epoch = str(header["epoch"])
        else:
            epoch = new_epoch()
            LOG.warning(
                "restored a snapshot written before an unclean stop: envelopes acknowledged "
                "after it may be lost, so the epoch changes"
            )
        self.store.adopt_epoch(epoch)
        if self.config is not None:
            self._open_journal()
        LOG.info("serving epoch %s", self.store.epoch)
        # The restored state is on disk already, but the next write must record
        # the (possibly new) epoch; mark it changed.
        self._written_version = -1

    # ---------------------------------------------------------------- journal
    def _replay_journal(self, header: dict[str, Any] | None) -> str:
        """Replay the segments after the snapshot; returns the epoch to serve."""
        assert self.config is not None
        repair = self.config.repair == "truncate"
        start = int(header.get("journal_next", 0)) if header is not None else 1
        segments = list_segments(self.dir)
        for n, path in segments:
            if n < start:  # covered by the snapshot; left by a stop before their removal
                path.unlink(missing_ok=True)
        segments = [(n, p) for n, p in segments if n >= start]
        damaged = False
        expected = start if header is not None and start else (segments[0][0] if segments else 1)
        if header is None and segments and segments[0][0] != 1:
            damaged = self._damage(
                repair,
                f"the snapshot is missing: the journal starts at {segments[0][1].name}, so "
                "the segments before it were folded into a snapshot that is gone",
            )
            expected = segments[0][0]
        started = time.perf_counter()
        cpu = time.process_time()
        replayed = 0
        last_header: list[Any] | None = None
        clean = False
        kept: list[tuple[int, Path]] = []
        cut_rest = False  # a repair keeps only what comes before the damage
        lost = False  # an `off` run's torn segment dropped what came after it
        for i, (n, path) in enumerate(segments):
            if not cut_rest and n != expected:
                damaged = cut_rest = self._damage(
                    repair,
                    f"journal segment {segment_name(expected)} is missing before {path.name}",
                )
            if cut_rest:
                path.unlink()  # only reached when repairing (or after an `off` tear)
                continue
            expected = n + 1
            # Records are applied as they are read and checked; what follows the
            # last whole one is decided once the segment has been read. Damage
            # that stops start-up leaves a half-filled store that is thrown away.
            scan = Scan(path)
            replayed += self.store.replay(read_segment(scan))
            last = i == len(segments) - 1
            if scan.damage == "torn" and last:
                LOG.warning(
                    "journal %s ends in a record cut short by a crash: dropped its last "
                    "%d bytes (nothing in them was acknowledged)",
                    path.name,
                    scan.size - scan.good_end,
                )
                self._cut(path, scan.good_end)
            elif scan.damage == "torn" and scan.header is not None and scan.header[3] == "off":
                # Written by an `off` run that did not sync segments it closed (older
                # relays did not): a machine crash can tear any of them. What `off`
                # promises allows it: keep what comes before the tear, drop the rest.
                LOG.warning(
                    "journal %s (fsync off) was cut short by a machine crash before its "
                    "end: dropped its last %d bytes and the %d segments after it; the "
                    "epoch changes",
                    path.name,
                    scan.size - scan.good_end,
                    len(segments) - i - 1,
                )
                self._cut(path, scan.good_end)
                lost = cut_rest = True
            elif scan.damage:
                what = "ends short" if scan.damage == "torn" else scan.damage
                damaged = cut_rest = self._damage(
                    repair,
                    f"journal {str(path)!r} is damaged at offset {scan.damage_at} ({what})",
                )
                self._cut(path, scan.good_end)
            if scan.good_end <= len(MAGIC) and not scan.count:
                path.unlink()
                continue
            kept.append((n, path))
            if scan.header is not None:
                last_header = scan.header
            clean = scan.last_kind == "c"
        self.replayed = replayed
        self.replay_seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        self._segments = kept
        self._next_segment = max([start, *(n + 1 for n, _ in kept), 1])
        if kept:
            stats = self.store.stats_now()
            LOG.info(
                "replayed %d journal records from %d segments in %.2f s (%.2f s of CPU): "
                "%d workspaces, %d envelopes",
                replayed,
                len(kept),
                self.replay_seconds,
                cpu,
                stats.workspaces,
                stats.envelopes,
            )
        if damaged:
            LOG.warning(
                "HIVE_RELAY_JOURNAL_REPAIR=truncate: kept everything before the damage; "
                "the epoch changes"
            )
            return new_epoch()
        if lost:
            return new_epoch()
        if last_header is not None:
            epoch, mode = str(last_header[2]), str(last_header[3])
            if clean or mode == "always":
                return epoch
            LOG.warning(
                "the last run (fsync %s) stopped uncleanly: envelopes acknowledged in its "
                "last second may be lost, so the epoch changes",
                mode,
            )
            return new_epoch()
        if header is None:
            LOG.info("no snapshot or journal yet in the data dir; starting empty")
            return self.store.epoch
        if header.get("clean"):
            return str(header["epoch"])
        LOG.warning(
            "restored a snapshot written before an unclean stop, with no journal after it: "
            "envelopes acknowledged after it may be lost, so the epoch changes"
        )
        return new_epoch()

    @staticmethod
    def _damage(repair: bool, what: str) -> bool:
        if not repair:
            raise JournalError(
                f"HIVE_RELAY_DATA_DIR: {what}; start with --journal-repair=truncate "
                "(HIVE_RELAY_JOURNAL_REPAIR=truncate) to keep everything before it (the "
                "epoch changes), or restore a backup"
            )
        LOG.warning("journal repair: %s; keeping everything before it", what)
        return True

    @staticmethod
    def _cut(path: Path, size: int) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())

    def _open_journal(self) -> None:
        assert self.config is not None
        existing = sum(p.stat().st_size for _, p in self._segments)
        try:
            self.journal = Journal(
                self.dir,
                self.config.mode,
                self.config.segment_bytes,
                self.store.epoch,
                self._next_segment,
                existing,
            )
        except OSError as exc:
            raise SnapshotError(
                f"HIVE_RELAY_DATA_DIR: cannot start a journal segment in {str(self.dir)!r} "
                f"({exc.strerror or exc})"
            ) from None
        for n, p in self._segments:
            self.journal.segment_sizes[n] = p.stat().st_size
        self.store.attach_journal(self.journal)

    # ---------------------------------------------------------------- writing
    async def write(self, clean: bool) -> None:
        async with self._lock:
            journal = self.journal
            if journal is not None and journal.failed is not None:
                return  # the disk is not trusted any more; a restart replays the journal
            next_segment = 0
            if journal is not None:
                # Everything handed to the journal before this point is in the
                # snapshot; everything after goes to the new segment.
                next_segment = journal.rotate()
                rotated = journal.lsn
            version = self.store.version
            workspaces, pairs = self.store.export_state()
            header = {
                "t": "header",
                "format": "hive-relay-snapshot",
                "version": FORMAT_VERSION,
                "epoch": self.store.epoch,
                "clean": clean,
                "written_at": time.time(),
                "journal_next": next_segment,
            }
            started = time.perf_counter()
            if journal is not None:
                # The new segment exists on disk before a snapshot names it.
                fut = journal.wait(rotated)
                if fut is not None:
                    await fut
            self.last_size = await anyio.to_thread.run_sync(
                write_snapshot, self.path, header, workspaces, pairs
            )
            if journal is not None:
                covered = journal.forget_segments_before(next_segment)
                await anyio.to_thread.run_sync(_unlink_all, covered)
                self._written_lsn = rotated
            self.last_write_seconds = time.perf_counter() - started
            self._written_version = version
            self._written_at = time.monotonic()

    def _due(self) -> bool:
        now = time.monotonic()
        if self.store.version != self._written_version and now - self._written_at >= self.interval:
            return True
        j = self.journal
        if j is None or j.failed is not None or j.lsn <= self._written_lsn + 1:
            return False
        return j.total_bytes >= self.config.max_bytes or (  # type: ignore[union-attr]
            now - self._written_at >= self.config.max_age  # type: ignore[union-attr]
        )

    async def run(self) -> None:
        tick = self.interval if self.journal is None else min(self.interval, 1.0)
        while True:
            await anyio.sleep(tick)
            if self._due():
                try:
                    await self.write(clean=False)
                except OSError:
                    LOG.exception("writing the snapshot failed; the previous one is kept")

    async def write_final(self) -> None:
        with anyio.CancelScope(shield=True):
            journal = self.journal
            if journal is not None and journal.failed is not None:
                LOG.warning("no shutdown snapshot: the journal failed; the next start replays it")
                await journal.close(clean=False)
                return
            try:
                if journal is not None:
                    await journal.wait_all()
                await self.write(clean=True)
                LOG.info("wrote the shutdown snapshot (%d bytes)", self.last_size)
            except OSError:
                LOG.exception("writing the shutdown snapshot failed")
            except StoreUnavailable:
                pass
            if journal is not None:
                await journal.close(clean=True)


def _unlink_all(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
