"""Workspace against a real relay: convergence, end-to-end encryption, keys, cursor, restarts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest

from client import (
    ConfigError,
    DecryptError,
    Device,
    Event,
    FileCursorStore,
    Gap,
    KeyMissing,
    MemoryCursorStore,
    NotSealed,
    RelayClient,
    RelayReset,
    SyncWorkspace,
    Unopenable,
    Workspace,
    WorkspaceKey,
    parse_envelope,
)
from tests.client.support import FAST, WAIT, DroppingProxy, collect, data_of, new_workspace_id
from tests.conftest import FIXTURES
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

VECTORS = json.loads((FIXTURES / "hive_crypto_vectors.json").read_text())
PASSPHRASE = VECTORS["passphrase"]


def workspace(url: str, ws_id: str, key: Any, **kwargs: Any) -> Workspace:
    return Workspace(url, ws_id, key, **{**FAST, **kwargs})


# --------------------------------------------------------------------------- convergence


async def test_two_workspaces_converge(relay: RelayProcess, ws_id: str) -> None:
    key = WorkspaceKey.generate()
    async with workspace(relay.url, ws_id, key) as alice, workspace(relay.url, ws_id, key) as bob:
        sent = [await alice.send({"from": "alice", "n": i}) for i in range(3)]

        async def reply(item: Any) -> None:
            if isinstance(item, Event) and item.data["n"] == 2:
                await bob.send({"from": "bob", "n": 3})

        items = await collect(bob, 4, on_event=reply)
        assert [i.seq for i in items if isinstance(i, Event)][:3] == sent
        assert data_of(items) == [
            {"from": "alice", "n": 0},
            {"from": "alice", "n": 1},
            {"from": "alice", "n": 2},
            {"from": "bob", "n": 3},
        ]
        assert bob.cursor == items[-1].seq
        assert bob.transport == "sse"
        assert data_of(await collect(alice, 4)) == data_of(items)


async def test_passphrase_and_hex_key_interoperate(relay: RelayProcess, ws_id: str) -> None:
    async with (
        workspace(relay.url, ws_id, PASSPHRASE) as a,
        workspace(relay.url, ws_id, VECTORS["derived_key_hex"]) as b,
    ):
        await a.send({"hello": "\u2713"})
        [event] = [i async for i in b.events(live=False)]
        assert isinstance(event, Event) and event.data == {"hello": "\u2713"}
        assert event.key_epoch == 0


async def test_opens_a_body_written_by_the_independent_implementation(
    relay: RelayProcess, ws_id: str
) -> None:
    with RelayClient(relay.url) as api:
        api.push(ws_id, VECTORS["sealed_epoch0"])
    async with workspace(relay.url, ws_id, PASSPHRASE) as ws:
        [event] = [i async for i in ws.events(live=False)]
    assert isinstance(event, Event)
    assert event.plaintext.decode() == VECTORS["plaintext"]
    assert event.data["kind"] == "messageAppended"


async def test_send_many(relay: RelayProcess, ws_id: str) -> None:
    async with workspace(relay.url, ws_id, PASSPHRASE) as ws:
        seqs = await ws.send_many({"i": i} for i in range(5))
        items = [i async for i in ws.events(live=False)]
    assert [i.seq for i in items] == seqs
    assert data_of(items) == [{"i": i} for i in range(5)]


# --------------------------------------------------------------------------- what the relay sees


async def test_relay_only_sees_ciphertext(relay: RelayProcess, ws_id: str) -> None:
    secret = "purple-elephant-4711"
    async with workspace(relay.url, ws_id, PASSPHRASE) as ws:
        await ws.send({"note": secret})
        await ws.send({"note": secret}, format="compact")
    with RelayClient(relay.url) as api:
        rows = api.fetch(ws_id).rows
    assert len(rows) == 2
    for row in rows:
        assert secret.encode() not in row.body
        assert b"note" not in row.body
        parse_envelope(row.body)  # a sealed envelope, nothing else
    assert set(json.loads(rows[0].body)) == {"ciphertext", "nonce", "version"}


async def test_wrong_key_gets_nothing_and_does_not_crash(relay: RelayProcess, ws_id: str) -> None:
    async with workspace(relay.url, ws_id, PASSPHRASE) as writer:
        seqs = [await writer.send({"i": i}) for i in range(2)]
    async with workspace(relay.url, ws_id, WorkspaceKey.generate()) as stranger:
        items = [i async for i in stranger.events(live=False)]
        assert [type(i) for i in items] == [Unopenable, Unopenable]
        assert all(isinstance(i.error, DecryptError) for i in items)
        # Nothing to wait for: a wrong key will never open them, so the cursor moves on.
        assert stranger.cursor == seqs[-1]


async def test_real_hive_bodies_are_unopenable_not_fatal(relay: RelayProcess, ws_id: str) -> None:
    with RelayClient(relay.url) as api:
        for path in sorted((FIXTURES / "hive_envelopes").glob("*.json")):
            api.push(ws_id, path.read_bytes())
    async with workspace(relay.url, ws_id, PASSPHRASE) as ws:
        await ws.send({"after": "hive"})
        items = [i async for i in ws.events(live=False)]
    assert [type(i) for i in items] == [Unopenable, Unopenable, Event]


async def test_plaintext_envelopes_only_when_allowed(relay: RelayProcess, ws_id: str) -> None:
    with RelayClient(relay.url) as api:
        api.push(ws_id, {"kind": "plain"})
    async with workspace(relay.url, ws_id, PASSPHRASE) as strict:
        [item] = [i async for i in strict.events(live=False)]
        assert isinstance(item, Unopenable) and isinstance(item.error, NotSealed)
    async with workspace(relay.url, ws_id, PASSPHRASE, allow_plaintext=True) as lenient:
        [item] = [i async for i in lenient.events(live=False)]
        assert isinstance(item, Event) and item.data == {"kind": "plain"}
        assert item.key_epoch is None


async def test_compact_bodies_do_not_open_in_another_workspace(relay: RelayProcess) -> None:
    home, other = new_workspace_id(), new_workspace_id()
    key = WorkspaceKey.generate()
    async with workspace(relay.url, home, key, seal_format="compact") as ws:
        await ws.send({"where": "home"})
        [event] = [i async for i in ws.events(live=False)]
        assert isinstance(event, Event) and event.data == {"where": "home"}
    with RelayClient(relay.url) as api:
        [row] = api.fetch(home).rows
        api.push(other, row.body)  # someone copies the body into another workspace
    async with workspace(relay.url, other, key) as elsewhere:
        [moved] = [i async for i in elsewhere.events(live=False)]
    assert isinstance(moved, Unopenable) and isinstance(moved.error, DecryptError)


# --------------------------------------------------------------------------- keys and rotation


async def test_rotation_removes_a_device(relay: RelayProcess, ws_id: str) -> None:
    devices = {name: Device.generate(name) for name in ("alice", "bob", "carol")}

    def member(name: str) -> Workspace:
        return workspace(relay.url, ws_id, PASSPHRASE, device=devices[name])

    async with member("alice") as alice, member("bob") as bob, member("carol") as carol:
        before = await alice.send({"msg": "everyone"})
        epoch = await alice.rotate(
            {name: devices[name].public_key for name in ("alice", "bob")}  # carol removed
        )
        assert epoch == 1
        after = await alice.send({"msg": "without carol"})

        bob_items = [i async for i in bob.events(live=False)]
        assert [(i.seq, i.data, i.key_epoch) for i in bob_items if isinstance(i, Event)] == [
            (before, {"msg": "everyone"}, 0),
            (after, {"msg": "without carol"}, 1),
        ]
        assert bob.keyring.epochs == (0, 1)

        carol_items = [i async for i in carol.events(live=False)]
        assert data_of(carol_items) == [{"msg": "everyone"}]
        assert carol_items[-1] == KeyMissing(seq=after, epoch=1)
        assert carol.cursor == before  # stopped, not skipped
        assert carol.keyring.epochs == (0,)

        # Bob can rotate too, and epochs keep increasing across members.
        assert await bob.rotate({"bob": devices["bob"].public_key}) == 2


async def test_stopped_cursor_resumes_when_the_key_arrives(relay: RelayProcess, ws_id: str) -> None:
    old = WorkspaceKey.generate()
    new = WorkspaceKey.generate()
    async with (
        workspace(relay.url, ws_id, old) as writer,
        workspace(relay.url, ws_id, old) as reader,
    ):
        await writer.send({"n": 0})
        writer.keyring.add(1, new)
        await writer.send({"n": 1})
        await writer.send({"n": 2})

        async def give_key(item: Any) -> None:
            if isinstance(item, KeyMissing):
                assert reader.cursor < item.seq
                reader.keyring.add(item.epoch, new)

        items = await collect(reader, 3, on_event=give_key)
        assert [type(i) for i in items] == [Event, KeyMissing, Event, Event]
        assert data_of(items) == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_live_reader_adopts_a_rotation_from_the_keyring(
    relay: RelayProcess, ws_id: str
) -> None:
    me, peer = Device.generate("me"), Device.generate("peer")
    async with (
        workspace(relay.url, ws_id, PASSPHRASE, device=peer) as sender,
        workspace(relay.url, ws_id, PASSPHRASE, device=me) as reader,
    ):

        async def rotate_then_send(item: Any) -> None:
            if isinstance(item, Event) and item.data == {"n": 0}:
                await sender.rotate({"me": me.public_bytes, "peer": peer.public_hex})
                await sender.send({"n": 1})

        await sender.send({"n": 0})
        items = await collect(reader, 2, on_event=rotate_then_send)
        assert [(i.data, i.key_epoch) for i in items if isinstance(i, Event)] == [
            ({"n": 0}, 0),
            ({"n": 1}, 1),
        ]
        assert not any(isinstance(i, KeyMissing) for i in items)


# --------------------------------------------------------------------------- cursor


async def test_cursor_store_and_at_least_once(
    relay: RelayProcess, ws_id: str, tmp_path: Path
) -> None:
    store = FileCursorStore(tmp_path / "cursor.json")
    async with workspace(relay.url, ws_id, PASSPHRASE) as writer:
        seqs = [await writer.send({"i": i}) for i in range(3)]

    async with workspace(relay.url, ws_id, PASSPHRASE, cursor_store=store) as reader:
        async for item in reader.events(live=False):
            assert isinstance(item, Event)
            if item.data == {"i": 1}:
                break  # the program stops while handling i=1
        assert reader.cursor == seqs[1]
    saved = store.load(ws_id)
    assert saved is not None and saved.seq == seqs[0]  # i=1 was never acknowledged

    async with workspace(relay.url, ws_id, PASSPHRASE, cursor_store=store) as again:
        assert data_of([i async for i in again.events(live=False)]) == [{"i": 1}, {"i": 2}]
        await again.commit()
    saved = store.load(ws_id)
    assert saved is not None and saved.seq == seqs[2] and saved.relay_epoch

    async with workspace(relay.url, ws_id, PASSPHRASE, cursor_store=store) as done:
        assert [i async for i in done.events(live=False)] == []
        assert data_of([i async for i in done.events(after=0, live=False)]) == [
            {"i": 0},
            {"i": 1},
            {"i": 2},
        ]


async def test_a_new_iteration_supersedes_the_old_one(relay: RelayProcess, ws_id: str) -> None:
    async with workspace(relay.url, ws_id, PASSPHRASE) as ws:
        for i in range(3):
            await ws.send({"i": i})
        async for _ in ws.events(live=False):
            break  # not closed explicitly: a later iteration must still work
        first = ws.events(live=False)
        assert data_of([await first.__anext__()]) == [{"i": 1}]
        assert data_of([i async for i in ws.events(live=False)]) == [{"i": 2}]
        with pytest.raises(RuntimeError, match="superseded"):
            await first.__anext__()


# --------------------------------------------------------------------------- a lossy network


async def test_retry_after_a_dropped_connection_does_not_duplicate(
    relay: RelayProcess, ws_id: str
) -> None:
    proxy = DroppingProxy(relay.port)
    try:
        async with workspace(proxy.url, ws_id, PASSPHRASE) as ws:
            proxy.drop_responses(2)  # the relay appends, the answer is lost, twice
            seq = await ws.send({"pay": 100})
            assert proxy.dropped == 2
            seq2 = await ws.send({"pay": 100})  # the same content sent again on purpose
    finally:
        proxy.close()
    with RelayClient(relay.url) as api:
        rows = api.fetch(ws_id).rows
    assert [r.seq for r in rows] == [seq, seq2]


async def test_live_reader_survives_dropped_streams(relay: RelayProcess, ws_id: str) -> None:
    proxy = DroppingProxy(relay.port)
    try:
        async with (
            workspace(relay.url, ws_id, PASSPHRASE) as writer,
            workspace(proxy.url, ws_id, PASSPHRASE) as reader,
        ):
            await writer.send({"n": 0})

            async def cut_then_send(item: Any) -> None:
                if isinstance(item, Event) and item.data["n"] < 3:
                    proxy.drop_responses(1)  # the next bytes of the stream never arrive
                    await writer.send({"n": item.data["n"] + 1})

            items = await collect(reader, 4, on_event=cut_then_send)
            assert data_of(items) == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
            assert proxy.dropped >= 3
    finally:
        proxy.close()


# --------------------------------------------------------------------------- relay restarts


@pytest.fixture
def snapshot_relay(tmp_path: Path) -> Iterator[RelayProcess]:
    proc = RelayProcess(env={"HIVE_RELAY_DATA_DIR": str(tmp_path / "relay-data")})
    with proc:
        yield proc


def restart(proc: RelayProcess) -> None:
    """Stop the relay gracefully and start it again on the same port and settings."""
    assert proc.stop() == 0
    proc.start()


async def test_resume_after_restart_with_snapshot(
    snapshot_relay: RelayProcess, ws_id: str, tmp_path: Path
) -> None:
    store = FileCursorStore(tmp_path / "cursor.json")
    async with workspace(snapshot_relay.url, ws_id, PASSPHRASE) as writer:
        await writer.send({"n": 0})
        await writer.send({"n": 1})
    async with workspace(snapshot_relay.url, ws_id, PASSPHRASE, cursor_store=store) as reader:
        assert len([i async for i in reader.events(live=False)]) == 2
        await reader.commit()

    restart(snapshot_relay)

    async with workspace(snapshot_relay.url, ws_id, PASSPHRASE) as writer:
        await writer.send({"n": 2})
    async with workspace(snapshot_relay.url, ws_id, PASSPHRASE, cursor_store=store) as reader:
        items = [i async for i in reader.events(live=False)]
    # The snapshot kept history and the relay epoch: only the new event, no reset.
    assert data_of(items) == [{"n": 2}]
    assert not any(isinstance(i, RelayReset | Gap) for i in items)


async def test_live_reader_follows_across_a_restart(
    snapshot_relay: RelayProcess, ws_id: str
) -> None:
    async with (
        workspace(snapshot_relay.url, ws_id, PASSPHRASE) as writer,
        workspace(snapshot_relay.url, ws_id, PASSPHRASE) as reader,
    ):
        await writer.send({"n": 0})

        async def restart_then_send(item: Any) -> None:
            if isinstance(item, Event) and item.data == {"n": 0}:
                await anyio.to_thread.run_sync(restart, snapshot_relay)
                await writer.send({"n": 1})

        items = await collect(reader, 2, on_event=restart_then_send)
        assert data_of(items) == [{"n": 0}, {"n": 1}]


async def test_restart_without_snapshot_is_a_relay_reset(ws_id: str) -> None:
    store = MemoryCursorStore()
    with RelayProcess() as proc:
        async with workspace(proc.url, ws_id, PASSPHRASE) as writer:
            first = await writer.send({"n": 0})
        async with workspace(proc.url, ws_id, PASSPHRASE, cursor_store=store) as reader:
            assert len([i async for i in reader.events(live=False)]) == 1
            epoch_before = reader.relay_epoch
            await reader.commit()

        restart(proc)  # the memory store forgets everything

        async with workspace(proc.url, ws_id, PASSPHRASE) as writer:
            second = await writer.send({"n": 1})
        assert second > first  # seqs never rewind, even after forgetting
        async with workspace(proc.url, ws_id, PASSPHRASE, cursor_store=store) as reader:
            items = [i async for i in reader.events(live=False)]
    assert isinstance(items[0], RelayReset)
    assert items[0].previous == epoch_before and items[0].current != epoch_before
    assert data_of(items) == [{"n": 1}]


# --------------------------------------------------------------------------- gaps


@pytest.fixture(scope="module")
def short_relay() -> Iterator[RelayProcess]:
    with RelayProcess(env={"HIVE_RELAY_MAX_ENVELOPES": "3", "HIVE_RELAY_PUSH_RATE": "0"}) as proc:
        yield proc


@pytest.mark.parametrize("live", [False, True], ids=["fetch", "stream"])
async def test_dropped_history_is_a_gap_event(short_relay: RelayProcess, live: bool) -> None:
    ws_id = new_workspace_id()
    async with workspace(short_relay.url, ws_id, PASSPHRASE) as writer:
        seqs = [await writer.send({"n": i}) for i in range(5)]
    async with workspace(short_relay.url, ws_id, PASSPHRASE) as reader:
        if live:
            items = await collect(reader, 3)
        else:
            items = [i async for i in reader.events(live=False)]
    assert items[0] == Gap(after=0, oldest=seqs[2])
    assert data_of(items) == [{"n": 2}, {"n": 3}, {"n": 4}]
    assert sum(isinstance(i, Gap) for i in items) == 1


# --------------------------------------------------------------------------- construction


def test_from_env(relay: RelayProcess, tmp_path: Path) -> None:
    device = Device.generate("dev-1")
    env = {
        "HIVE_RELAY_URL": relay.url,
        "HIVE_WORKSPACE": "team",
        "HIVE_WORKSPACE_KEY": PASSPHRASE,
        "HIVE_RELAY_ACCESS_TOKEN": "tok",
        "HIVE_WORKSPACE_KEY_EPOCH": "3",
        "HIVE_DEVICE_ID": "dev-1",
        "HIVE_DEVICE_KEY": device.secret_hex(),
        "HIVE_CURSOR_FILE": str(tmp_path / "c.json"),
    }
    ws = Workspace.from_env(env)
    assert ws.workspace == "team" and ws.client.base_url == relay.url
    assert ws.keyring.epochs == (3,)
    assert ws.keyring.get(3).hex() == VECTORS["derived_key_hex"]
    assert ws.device is not None and ws.device.public_hex == device.public_hex
    assert isinstance(ws.cursor_store, FileCursorStore)
    hexed = Workspace.from_env({**env, "HIVE_WORKSPACE_KEY": VECTORS["derived_key_hex"]})
    assert hexed.keyring.get(3).hex() == VECTORS["derived_key_hex"]
    override = Workspace.from_env(env, workspace="other", key_epoch=0)
    assert override.workspace == "other" and override.keyring.epochs == (0,)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("HIVE_RELAY_URL", "HIVE_RELAY_URL"),
        ("HIVE_WORKSPACE", "HIVE_WORKSPACE"),
        ("HIVE_WORKSPACE_KEY", "HIVE_WORKSPACE_KEY"),
    ],
)
def test_from_env_names_what_is_missing(missing: str, message: str) -> None:
    env = {"HIVE_RELAY_URL": "http://x", "HIVE_WORKSPACE": "w", "HIVE_WORKSPACE_KEY": "pass"}
    del env[missing]
    with pytest.raises(ConfigError, match=message):
        Workspace.from_env(env)


def test_from_env_rejects_unusable_values() -> None:
    env = {"HIVE_RELAY_URL": "http://x", "HIVE_WORKSPACE": "w", "HIVE_WORKSPACE_KEY": "pass"}
    with pytest.raises(ConfigError, match="HIVE_DEVICE_KEY"):
        Workspace.from_env({**env, "HIVE_DEVICE_ID": "d"})
    with pytest.raises(ConfigError, match="HIVE_WORKSPACE_KEY_EPOCH"):
        Workspace.from_env({**env, "HIVE_WORKSPACE_KEY_EPOCH": "one"})
    with pytest.raises(ConfigError, match="http"):
        Workspace.from_env({**env, "HIVE_RELAY_URL": "relay.example.com"})


# --------------------------------------------------------------------------- the sync facade


def test_sync_workspace(relay: RelayProcess, ws_id: str) -> None:
    with (
        SyncWorkspace(relay.url, ws_id, PASSPHRASE, **FAST) as alice,
        SyncWorkspace(relay.url, ws_id, PASSPHRASE, **FAST) as bob,
    ):
        seqs = [alice.send({"n": 0}), *alice.send_many([{"n": 1}, {"n": 2}])]
        assert data_of(list(bob.events(live=False))) == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert bob.cursor == seqs[-1]

        live = bob.events()
        alice.send({"n": 3})
        with ThreadPoolExecutor(1) as pool:  # bounds the wait: events() blocks its thread
            item = pool.submit(next, live).result(timeout=WAIT)
        live.close()
        assert isinstance(item, Event) and item.data == {"n": 3}
        assert bob.transport == "sse"
