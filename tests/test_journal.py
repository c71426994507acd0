"""The write-ahead journal at unit level, with real files: replay, torn tails at
every byte offset, mid-file damage and repair, missing snapshots, the
durability gate, and a failing disk. Process-level crash tests are in
tests/test_journal_process.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from relay.store import journal as journal_mod
from relay.store.base import Bounds, StoreUnavailable
from relay.store.journal import FRAME, MAGIC, JournalError, list_segments, scan_segment
from relay.store.memory import MemoryStore
from relay.store.snapshot import FILENAME, JournalConfig, Snapshotter


def open_dir(
    path: Path, mode: str = "always", repair: str = "off", bounds: Bounds | None = None
) -> tuple[MemoryStore, Snapshotter]:
    store = MemoryStore(bounds)
    snap = Snapshotter(store, str(path), 30, JournalConfig(mode=mode, repair=repair))
    snap.restore()
    return store, snap


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def crash(store: MemoryStore, snap: Snapshotter) -> None:
    """Stop the writer after all it was handed, leaving no clean marker (a kill -9
    after the records reached the disk)."""
    assert snap.journal is not None
    await snap.journal.close(clean=False)


def rows(store: MemoryStore, ws: str) -> list[bytes]:
    return store.read_now(ws, 0, 1_000_000, 1 << 40).rows


def record_offsets(path: Path) -> list[int]:
    """Where each record of a segment starts."""
    data = path.read_bytes()
    pos, out = len(MAGIC), []
    while pos < len(data):
        out.append(pos)
        n, _ = FRAME.unpack_from(data, pos)
        pos += FRAME.size + n
    return out


async def fill(store: MemoryStore) -> None:
    await store.start()
    for i in range(5):
        await store.append("w", b'{"i":%d}' % i, b"k%d" % i)
    await store.append_batch("w", [b"1", b"2"], [b"b1", b"b2"])
    await store.keyring_append("w", b'{"v":1}')
    await store.device_put("presence", "w", "dev", b"{}")
    await store.pair_create('"p"', 600)


def test_replay_restores_every_kind_of_change_exactly(tmp_path: Path) -> None:
    bounds = Bounds(max_envelopes=4)  # drops are journaled and replayed too

    async def go() -> Any:
        store, snap = open_dir(tmp_path, bounds=bounds)
        await fill(store)
        state = store.export_state()
        await crash(store, snap)
        return store.epoch, state

    epoch, (workspaces, pairs) = run(go())
    again, snap = open_dir(tmp_path, bounds=bounds)
    assert again.epoch == epoch  # always: a crash lost nothing acknowledged
    got, got_pairs = again.export_state()
    assert got == workspaces and got_pairs == pairs
    assert len(rows(again, "w")) == 4 and again.read_now("w", 0, 1, 1).dropped > 0
    assert snap.replayed > 0


def test_checkpoint_covers_and_removes_segments_and_replay_continues_after_it(
    tmp_path: Path,
) -> None:
    async def go() -> list[bytes]:
        store, snap = open_dir(tmp_path)
        await fill(store)
        await snap.write(clean=False)
        await store.append("w", b"99", b"after")
        out = rows(store, "w")
        await crash(store, snap)
        return out

    before = run(go())
    segments = list_segments(tmp_path)
    assert [n for n, _ in segments] == [2]  # segment 1 was covered and removed
    store, _ = open_dir(tmp_path)
    assert rows(store, "w") == before


def test_a_torn_last_record_is_cut_at_every_byte_offset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"

    async def go() -> list[bytes]:
        store, snap = open_dir(src)
        await store.start()
        for i in range(3):
            await store.append("w", b'{"i":%d}' % i, b"k%d" % i)
        kept = rows(store, "w")[:2]
        await crash(store, snap)
        return kept

    kept = run(go())
    ((_, seg),) = list_segments(src)
    data = seg.read_bytes()
    last = record_offsets(seg)[-1]
    caplog.set_level(logging.WARNING, "relay.snapshot")
    for cut in range(last, len(data)):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(src, work)
        (work / seg.name).write_bytes(data[:cut])
        caplog.clear()
        store, _ = open_dir(work)
        assert rows(store, "w") == kept, cut
        if cut > last:
            assert f"dropped its last {cut - last} bytes" in caplog.text, cut
        # The cut is made on disk: the next start finds a clean journal.
        assert scan_segment(work / seg.name).damage == ""
        shutil.rmtree(work)
    # Garbage in place of the last record (a machine crash) is a torn tail too.
    work = tmp_path / "garbage"
    shutil.copytree(src, work)
    (work / seg.name).write_bytes(data[: last + FRAME.size] + b"\xff" * (len(data) - last - 8))
    store, _ = open_dir(work)
    assert rows(store, "w") == kept


def test_a_damaged_middle_record_stops_start_up_unless_repair_truncates(tmp_path: Path) -> None:
    async def go() -> tuple[str, list[bytes]]:
        store, snap = open_dir(tmp_path)
        await store.start()
        for i in range(6):
            await store.append("w", b'{"i":%d}' % i, b"k%d" % i)
        out = rows(store, "w")
        await crash(store, snap)
        return store.epoch, out

    epoch, before = run(go())
    ((_, seg),) = list_segments(tmp_path)
    offsets = record_offsets(seg)
    bad = offsets[3]  # header, rows 0 and 1, then row 2
    data = bytearray(seg.read_bytes())
    data[bad + FRAME.size + 5] ^= 0x55
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalError) as info:
        open_dir(tmp_path)
    message = str(info.value)
    assert seg.name in message and f"offset {bad}" in message and "--journal-repair" in message
    assert "\n" not in message
    store, _ = open_dir(tmp_path, repair="truncate")
    assert rows(store, "w") == before[:2]
    assert store.epoch != epoch  # acknowledged envelopes are gone: clients must re-sync
    assert seg.stat().st_size == bad  # the damage and what followed it are cut
    again, _ = open_dir(tmp_path)  # and the next start needs no repair
    assert rows(again, "w") == before[:2]


def test_a_missing_snapshot_with_a_later_journal_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        store, snap = open_dir(tmp_path)
        await fill(store)
        await snap.write(clean=False)
        await store.append("w", b"99", b"after")
        await crash(store, snap)

    run(go())
    (tmp_path / FILENAME).unlink()
    with pytest.raises(JournalError, match="the snapshot is missing"):
        open_dir(tmp_path)
    store, _ = open_dir(tmp_path, repair="truncate")
    assert [r.endswith(b"99}") for r in rows(store, "w")] == [True]


def test_a_half_written_snapshot_leaves_the_old_one_and_the_journal(tmp_path: Path) -> None:
    async def go() -> list[bytes]:
        store, snap = open_dir(tmp_path)
        await fill(store)
        await snap.write(clean=False)
        await store.append("w", b"99", b"after")
        out = rows(store, "w")
        await crash(store, snap)
        return out

    before = run(go())
    good = (tmp_path / FILENAME).read_bytes()
    (tmp_path / f"{FILENAME}.tmp-12345").write_bytes(good[: len(good) // 2])
    store, _ = open_dir(tmp_path)
    assert rows(store, "w") == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_a_journal_without_a_snapshot_is_replayed_whole(tmp_path: Path) -> None:
    async def go() -> tuple[str, list[bytes]]:
        store, snap = open_dir(tmp_path, mode="everysec")
        await fill(store)
        out = rows(store, "w")
        await crash(store, snap)
        return store.epoch, out

    epoch, before = run(go())
    assert not (tmp_path / FILENAME).exists()
    store, _ = open_dir(tmp_path)
    assert rows(store, "w") == before
    # everysec: an unclean stop may have lost the last second, so the epoch changes.
    assert store.epoch != epoch
    assert run(store.keyring_list("w")) == [b'{"v":1}']


def test_a_clean_stop_keeps_the_epoch_in_every_mode(tmp_path: Path) -> None:
    for mode in ("everysec", "off"):
        path = tmp_path / mode

        async def go(path: Path = path, mode: str = mode) -> str:
            store, snap = open_dir(path, mode=mode)
            await fill(store)
            await snap.write_final()
            return store.epoch

        epoch = run(go())
        store, _ = open_dir(path, mode=mode)
        assert store.epoch == epoch, mode
        assert len(rows(store, "w")) == 7


class HeldSync:
    """An instrumented writer: each fsync waits until the test lets it return."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = journal_mod.Journal._sync

        def held(journal: journal_mod.Journal, *chunks: Any) -> None:
            # An `always` round writes and syncs in this one call (RWF_DSYNC):
            # held here, none of it is on disk or acknowledged yet.
            self.entered.set()
            assert self.release.wait(10)
            real(journal, *chunks)

        monkeypatch.setattr(journal_mod.Journal, "_sync", held)


def test_no_answer_reader_or_listener_sees_a_row_before_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldSync(monkeypatch)
    heard: list[int] = []

    async def go() -> None:
        store, snap = open_dir(tmp_path)
        store.set_listener(lambda ws, new: heard.extend(s for s, _ in new))
        await store.start()
        first = asyncio.ensure_future(store.append("w", b"1", b"a"))
        await asyncio.to_thread(held.entered.wait, 10)
        # A second publisher while the first fsync runs: group commit takes it next.
        second = asyncio.ensure_future(store.append("w", b"2", b"b"))
        dup = asyncio.ensure_future(store.append("w", b"1", b"a"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not first.done() and not second.done() and not dup.done()
        page = store.read_now("w", 0, 10, 1 << 20)
        assert page.rows == [] and page.head == 0
        assert heard == []
        held.release.set()
        (s1, _), (s2, _), (sd, was_dup) = await asyncio.gather(first, second, dup)
        assert (sd, was_dup) == (s1, True)
        assert heard == [s1, s2]
        assert len(rows(store, "w")) == 2
        assert snap.journal is not None
        assert snap.journal.stats.records_per_fsync.n >= 1
        await crash(store, snap)

    run(go())


def test_a_failed_fsync_refuses_every_later_write_but_reads_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        store, snap = open_dir(tmp_path)
        await store.start()
        seq, _ = await store.append("w", b"1", b"a")

        def broken(fd: int, *args: Any) -> None:
            raise OSError(errno.EIO, "Input/output error")

        # An `always` round syncs in its pwritev (RWF_DSYNC), a rotation with fsync.
        monkeypatch.setattr(journal_mod.os, "fsync", broken)
        monkeypatch.setattr(journal_mod.os, "pwritev", broken)
        with pytest.raises(StoreUnavailable) as info:
            await store.append("w", b"2", b"b")
        assert info.value.retry_after and "Input/output error" in info.value.message
        monkeypatch.undo()
        assert not await store.ping()
        for write in (
            store.append("w", b"3", b"c"),
            store.append_batch("w", [b"4"], [b"d"]),
            store.keyring_append("w", b"{}"),
            store.device_put("presence", "w", "d", b"{}"),
            store.pair_create("p", 60),
        ):
            with pytest.raises(StoreUnavailable, match="restarted"):
                await write
        # A retry of the refused push is refused too, not answered as a duplicate.
        with pytest.raises(StoreUnavailable):
            await store.append("w", b"2", b"b")
        assert [r.startswith(b'{"seq":%d' % seq) for r in rows(store, "w")] == [True]
        await snap.write_final()  # no snapshot over a failed disk; no clean marker
        assert not (tmp_path / FILENAME).exists()

    run(go())
    store, _ = open_dir(tmp_path)
    assert len(rows(store, "w")) >= 1  # what reached the disk; never less than acknowledged


def test_a_writer_that_dies_of_a_bug_fails_the_journal_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a disk error: the writer thread raising anything else used to leave
    # every waiting publisher (and shutdown) hanging on an answer that never came.
    def bug(*args: Any) -> None:
        raise RuntimeError("a bug")

    async def go() -> None:
        store, snap = open_dir(tmp_path)
        await store.start()
        monkeypatch.setattr(journal_mod.Journal, "_write_and_sync", bug)
        with pytest.raises(StoreUnavailable, match="writer stopped"):
            await asyncio.wait_for(store.append("w", b"1", b"a"), 10)
        assert not await store.ping()
        assert snap.journal is not None
        await asyncio.wait_for(snap.journal.close(clean=False), 10)

    run(go())


def open_small(path: Path, mode: str, repair: str = "off") -> tuple[MemoryStore, Snapshotter]:
    """Segments of about 300 bytes: every few appends rotate to a new one."""
    store = MemoryStore()
    config = JournalConfig(mode=mode, repair=repair, segment_bytes=300)
    snap = Snapshotter(store, str(path), 30, config)
    snap.restore()
    return store, snap


def test_every_mode_syncs_a_segment_when_it_closes_so_only_the_last_can_tear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = journal_mod.Journal._sync

    def tracked(journal: journal_mod.Journal) -> None:
        synced.append(journal._fd_segment)
        real(journal)

    monkeypatch.setattr(journal_mod.Journal, "_sync", tracked)

    async def go() -> None:
        store, snap = open_small(tmp_path, "off")
        await store.start()
        for i in range(12):
            await store.append("w", b'{"i":%d}' % i, b"k%d" % i)
        await crash(store, snap)

    run(go())
    numbers = [n for n, _ in list_segments(tmp_path)]
    assert len(numbers) >= 3
    # `off` syncs nothing per record, but each closed segment was synced before
    # the next was opened: a machine crash can tear only the last one.
    assert set(numbers[:-1]) <= set(synced)
    assert numbers[-1] not in synced


def write_off_journal(path: Path) -> tuple[str, list[bytes]]:
    async def go() -> tuple[str, list[bytes]]:
        store, snap = open_small(path, "off")
        await store.start()
        for i in range(12):
            await store.append("w", b'{"i":%d}' % i, b"k%d" % i)
        out = rows(store, "w")
        await crash(store, snap)
        return store.epoch, out

    result: tuple[str, list[bytes]] = run(go())
    return result


def test_a_torn_middle_segment_of_an_off_journal_starts_without_repair(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A journal as relays before the close-time sync left it after a machine
    # crash in `off` mode: an earlier segment lost its tail, later ones survived.
    epoch, before = write_off_journal(tmp_path)
    segments = list_segments(tmp_path)
    assert len(segments) >= 3
    _, first = segments[0]
    offsets = record_offsets(first)
    kept_in_first = len(offsets) - 1  # the header, then appends
    first.write_bytes(first.read_bytes()[: offsets[-1] + 3])
    caplog.set_level(logging.WARNING, "relay.snapshot")
    store, _ = open_dir(tmp_path, mode="off")
    assert rows(store, "w") == before[: kept_in_first - 1]  # a consistent prefix
    assert store.epoch != epoch  # acknowledged envelopes may be gone: clients re-sync
    assert "cut short by a machine crash" in caplog.text
    # The segments after the tear are gone; the new run writes the next one.
    assert [n for n, _ in list_segments(tmp_path)] == [1, 2]
    assert scan_segment(tmp_path / "journal-0000000000000002.log").records[0][0] == "h"
    again, _ = open_dir(tmp_path, mode="off")  # the next start finds a clean journal
    assert rows(again, "w") == before[: kept_in_first - 1]


def test_a_torn_middle_segment_of_an_always_journal_still_needs_repair(tmp_path: Path) -> None:
    # `always` synced every acknowledged record: a tear before the last segment
    # is damage to acknowledged data, not a crash's torn tail.
    async def go() -> None:
        store, snap = open_small(tmp_path, "always")
        await store.start()
        for i in range(12):
            await store.append("w", b'{"i":%d}' % i, b"k%d" % i)
        await crash(store, snap)

    run(go())
    _, first = list_segments(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(JournalError, match="ends short"):
        open_dir(tmp_path)


def test_a_tail_of_zeros_is_a_torn_tail(tmp_path: Path) -> None:
    # A machine crash can leave blocks the file was given but whose data never
    # reached the disk: zeros after the last whole record.
    _, before = write_off_journal(tmp_path)
    for _, last in list_segments(tmp_path)[::-1]:
        offsets = record_offsets(last)
        if len(offsets) > 1:  # the last segment holding an append
            break
        last.unlink()  # a segment the crash left with its header only
    data = last.read_bytes()
    last.write_bytes(data[: offsets[-1]] + bytes(len(data) - offsets[-1] + 64))
    store, _ = open_dir(tmp_path, mode="off")
    assert rows(store, "w") == before[:-1]


FIXTURE = Path(__file__).parent / "fixtures" / "journal-v1"


def test_a_journal_written_by_the_previous_release_still_replays(tmp_path: Path) -> None:
    # tests/fixtures/journal-v1 was written by the relay before bulk replay and
    # mapped reads (two segments, every kind of record, a crash stop, drops at a
    # cap of 6): the format is unchanged and must keep replaying exactly.
    import json

    expected = json.loads((FIXTURE / "expected.json").read_text())
    work = tmp_path / "data"
    shutil.copytree(FIXTURE, work)
    (work / "expected.json").unlink()
    store, snap = open_dir(work, bounds=Bounds(max_envelopes=6))
    assert store.epoch == expected["epoch"]  # always, crash: nothing was lost
    got = {
        w.name: {
            "rows": [r.decode() for r in w.rows],
            "head": w.head,
            "dropped": w.dropped,
            "keyring": [b.decode() for b in w.keyring],
        }
        for w in store.export_state()[0]
    }
    assert got == expected["workspaces"]
    assert run(store.device_map("presence", "w2")) == [("dev", b'{"p":1}')]
    assert [p for _, p, _ in store.export_state()[1]] == ['"pairing"']
    assert snap.replayed == 17  # two headers, 10 appends, a batch, 3 side writes, a drop


def test_records_are_checksummed_with_zlibs_crc32() -> None:
    # The journal may compute its CRC-32 with zlib-ng (faster); the checksum on
    # disk stays zlib's, so older relays and tools read the same format.
    import zlib

    data = journal_mod.frame(("a", "w", 1, b"k", b"x" * 1500, 0))
    n, crc = FRAME.unpack_from(data)
    assert n == len(data) - FRAME.size
    assert crc == zlib.crc32(data[FRAME.size :])


def test_bulk_replay_rebuilds_the_live_state_under_every_bound(tmp_path: Path) -> None:
    # Interleaved workspaces, batches, duplicates, a per-workspace cap and a byte
    # budget tight enough that the relay evicts other workspaces' rows and frees
    # empty ones: replay applies the journaled horizons in bulk and must end
    # where the live store was, charge for charge.
    import random

    rng = random.Random(14)
    bounds = Bounds(max_envelopes=25, max_bytes=60_000)

    async def go() -> Any:
        store, snap = open_dir(tmp_path, bounds=bounds)
        await store.start()
        for i in range(600):
            ws = f"w{rng.randrange(40)}"
            body = b'{"i":%d,"p":"%s"}' % (i, b"x" * rng.randrange(10, 400))
            if rng.random() < 0.15:
                n = rng.randrange(1, 6)
                keys = [b"b%d-%d" % (i, j) for j in range(n)]
                await store.append_batch(ws, [body] * n, keys)
            else:
                key = b"k%d" % rng.randrange(i + 1)  # some duplicates
                await store.append(ws, body, key)
            if rng.random() < 0.03:
                await store.keyring_append(ws, b'{"v":%d}' % i)
        state = store.export_state()
        counts = (store.stats_now(), store.charged_now())
        await crash(store, snap)
        return state, counts

    state, counts = run(go())
    store, snap = open_dir(tmp_path, bounds=bounds)
    assert store.export_state() == state
    assert (store.stats_now(), store.charged_now()) == counts
    assert snap.replayed > 600


def test_publishers_waiting_on_one_round_are_released_by_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Group commit on the loop side too: while one fsync runs, the records that
    # queue for the next one are written and synced in one round, and released by
    # one report from the writer thread (one call_soon_threadsafe), not one each.
    held = HeldSync(monkeypatch)

    async def go() -> None:
        store, snap = open_dir(tmp_path)
        await store.start()
        journal = snap.journal
        assert journal is not None
        reports: list[int] = []
        advance = journal._advance

        def counted(lsn: int) -> None:
            reports.append(lsn)
            advance(lsn)

        monkeypatch.setattr(journal, "_advance", counted)
        first = asyncio.ensure_future(store.append("w", b"0", b"k0"))
        await asyncio.to_thread(held.entered.wait, 10)
        rest = [
            asyncio.ensure_future(store.append("w", b"%d" % i, b"k%d" % i)) for i in range(1, 11)
        ]
        for _ in range(20):
            await asyncio.sleep(0)
        assert not any(t.done() for t in rest)
        assert len(journal._waiters) == 11
        held.release.set()
        seqs = [s for s, _ in await asyncio.gather(first, *rest)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 11
        assert len(reports) == 2  # the round being synced, and the next
        assert journal.stats.records_per_fsync.recent[-2:] == [1, 10]  # the ten in one
        assert not journal._waiters
        assert len(rows(store, "w")) == 11
        await crash(store, snap)

    run(go())
    store, _ = open_dir(tmp_path)
    assert len(rows(store, "w")) == 11


def test_a_cancelled_publisher_does_not_cancel_the_others_of_its_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Publishers of one group-commit round are released together. A client that
    # goes away (its task cancelled) must not cancel the wait of the rest: they
    # still get their answers, and a clean shutdown's wait for the journal does too.
    held = HeldSync(monkeypatch)

    async def go() -> None:
        store, snap = open_dir(tmp_path)
        await store.start()
        assert snap.journal is not None
        first = asyncio.ensure_future(store.append("w", b"0", b"k0"))
        await asyncio.to_thread(held.entered.wait, 10)
        gone = asyncio.ensure_future(store.append("w", b"1", b"k1"))
        stays = asyncio.ensure_future(store.append("w", b"2", b"k2"))
        flush = asyncio.ensure_future(snap.journal.wait_all())
        for _ in range(20):
            await asyncio.sleep(0)
        gone.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        held.release.set()
        await asyncio.wait_for(asyncio.gather(first, stays, flush), 10)
        assert gone.cancelled()
        assert stays.result()[0] > first.result()[0]
        await crash(store, snap)

    run(go())
    store, _ = open_dir(tmp_path)
    assert len(rows(store, "w")) == 3  # the cancelled publisher's record is kept too
