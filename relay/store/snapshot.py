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

import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec

from relay.settings import SettingsError
from relay.store.base import new_epoch
from relay.store.memory import MemoryStore, WorkspaceState

LOG = logging.getLogger("relay.snapshot")
MAGIC = b"HIVE-RELAY-SNAPSHOT\n"
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
        f.write(MAGIC)
        digest.update(MAGIC)
        size += len(MAGIC)
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
    if not data.startswith(MAGIC):
        raise SnapshotError(
            f"HIVE_RELAY_DATA_DIR: {where} is not a hive-relay snapshot; move it away "
            "or point HIVE_RELAY_DATA_DIR elsewhere"
        )
    decoder = msgspec.msgpack.Decoder()
    pos = len(MAGIC)
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


class Snapshotter:
    def __init__(self, store: MemoryStore, data_dir: str, interval: float) -> None:
        self.store = store
        self.dir = Path(data_dir)
        self.path = self.dir / FILENAME
        self.interval = interval
        self._written_version = -1
        self.last_write_seconds = 0.0
        self.last_size = 0
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
        if not self.path.exists():
            LOG.info(
                "no snapshot yet in the data dir; starting empty with epoch %s", self.store.epoch
            )
            return
        started = time.perf_counter()
        header, workspaces, pairs = read_snapshot(self.path)
        self.store.import_state(iter(workspaces), pairs)
        if header.get("clean"):
            self.store.adopt_epoch(str(header["epoch"]))
        else:
            self.store.adopt_epoch(new_epoch())
            LOG.warning(
                "restored a snapshot written before an unclean stop: envelopes acknowledged "
                "after it may be lost, so the epoch changes"
            )
        stats = self.store.stats_now()
        LOG.info(
            "restored snapshot: %d workspaces, %d envelopes in %.2f s; epoch %s",
            stats.workspaces,
            stats.envelopes,
            time.perf_counter() - started,
            self.store.epoch,
        )
        # The restored state is on disk already, but the next write must record
        # the (possibly new) epoch; mark it changed.
        self._written_version = -1

    async def write(self, clean: bool) -> None:
        async with self._lock:
            version = self.store.version
            workspaces, pairs = self.store.export_state()
            header = {
                "t": "header",
                "format": "hive-relay-snapshot",
                "version": FORMAT_VERSION,
                "epoch": self.store.epoch,
                "clean": clean,
                "written_at": time.time(),
            }
            started = time.perf_counter()
            self.last_size = await anyio.to_thread.run_sync(
                write_snapshot, self.path, header, workspaces, pairs
            )
            self.last_write_seconds = time.perf_counter() - started
            self._written_version = version

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            if self.store.version != self._written_version:
                try:
                    await self.write(clean=False)
                except OSError:
                    LOG.exception("writing the snapshot failed; the previous one is kept")

    async def write_final(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.write(clean=True)
                LOG.info("wrote the shutdown snapshot (%d bytes)", self.last_size)
            except OSError:
                LOG.exception("writing the shutdown snapshot failed")
