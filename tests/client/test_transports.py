"""Each live transport, forced and detected, against a real relay (or one hiding extensions)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from client import AsyncRelayClient, Event, Unsupported, Workspace, WorkspaceKey
from tests.client.support import FAST, WAIT, OlderRelay, data_of
from tests.relayproc import RelayProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def follow_while_sending(reader: Workspace, writer: Workspace, count: int) -> list[Any]:
    """Follow from the start while sending `count` events; the first `count + 1` received
    (one event is expected to be there already)."""
    received: list[Any] = []
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                async for item in reader.events():
                    if isinstance(item, Event):
                        received.append(item.data)
                        if len(received) == count + 1:
                            return

            tg.start_soon(read)
            for i in range(count):
                await anyio.sleep(0.02)  # let the reader park in its wait; order is not relied on
                await writer.send({"n": i})
    return received


@pytest.mark.parametrize("mode", ["sse", "nudge", "longpoll", "poll"])
async def test_forced_transport(relay: RelayProcess, ws_id: str, mode: str) -> None:
    key = WorkspaceKey.generate()
    async with (
        Workspace(relay.url, ws_id, key, **FAST) as writer,
        Workspace(
            relay.url,
            ws_id,
            key,
            transport=mode,
            **FAST,
        ) as reader,
    ):
        await writer.send({"n": "before"})
        received = await follow_while_sending(reader, writer, 3)
        assert received == [{"n": "before"}, {"n": 0}, {"n": 1}, {"n": 2}]
        assert reader.transport == mode


@pytest.mark.parametrize(
    ("older", "expected"),
    [
        (OlderRelay(events="ok"), "sse"),
        (OlderRelay(events="nudges"), "nudge"),
        (OlderRelay(events="404"), "longpoll"),
        (OlderRelay(events="405"), "longpoll"),
        (OlderRelay(events="json"), "longpoll"),
        (OlderRelay(events="404", long_poll=False), "poll"),
    ],
    ids=["full", "nudges-only", "no-stream", "stream-405", "stream-not-sse", "no-long-poll"],
)
async def test_auto_falls_back_to_what_the_relay_offers(
    relay: RelayProcess, ws_id: str, older: OlderRelay, expected: str
) -> None:
    key = WorkspaceKey.generate()
    client = AsyncRelayClient(relay.url, transport=older)
    async with (
        client,
        Workspace(relay.url, ws_id, key, **FAST) as writer,
        Workspace(relay.url, ws_id, key, client=client, **FAST) as reader,
    ):
        await writer.send({"n": "before"})
        received = await follow_while_sending(reader, writer, 2)
        assert received == [{"n": "before"}, {"n": 0}, {"n": 1}]
        assert reader.transport == expected
    # Detection went best-first: the full stream was always asked for first.
    first_live = next(p for p in older.paths if "/events" in p or "wait=" in p)
    assert "/events?" in first_live and "bodies=1" in first_live


async def test_forcing_a_transport_the_relay_lacks_fails_clearly(
    relay: RelayProcess, ws_id: str
) -> None:
    client = AsyncRelayClient(relay.url, transport=OlderRelay(events="404"))
    async with (
        client,
        Workspace(
            relay.url, ws_id, WorkspaceKey.generate(), client=client, transport="sse", **FAST
        ) as reader,
    ):
        with pytest.raises(Unsupported):
            async for _ in reader.events():
                pass


async def test_catch_up_needs_no_live_transport(relay: RelayProcess, ws_id: str) -> None:
    key = WorkspaceKey.generate()
    client = AsyncRelayClient(relay.url, transport=OlderRelay(events="404", long_poll=False))
    async with (
        client,
        Workspace(relay.url, ws_id, key) as writer,
        Workspace(relay.url, ws_id, key, client=client) as reader,
    ):
        await writer.send_many([{"i": i} for i in range(3)])
        items = [i async for i in reader.events(live=False)]
    assert data_of(items) == [{"i": 0}, {"i": 1}, {"i": 2}]
