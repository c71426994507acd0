"""Feeds: how rows travel from the relay to a `Workspace`, over each transport a relay may offer.

A feed is an async iterator of `FeedItem`s starting after a seq: rows in seq
order, gap notices, and `History` (the relay's epoch/gap headers of each
read). Feeds only move bytes: opening, the cursor and reconnecting belong to
the workspace. A feed ends when its connection ends; it raises `Unsupported`
before yielding anything when the relay lacks its transport.

* `stream_feed(bodies=True)`: SSE with whole rows (`/events?bodies=1`).
  If the relay ignores `bodies=1` and sends nudges, the same feed fetches.
* `stream_feed(bodies=False)`: the nudge stream (`/events`) plus fetches.
* `poll_feed(wait=S)`: long-poll reads; if the relay ignores `wait`, plain
  polling every `poll_interval`.
* `catch_up_feed`: reads until the relay says nothing more is waiting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from client.http import AsyncRelayClient, Page, Row
from client.wire import GapNotice, Nudge

__all__ = ["FeedItem", "History", "TransportMode", "catch_up_feed", "poll_feed", "stream_feed"]

#: How a workspace follows: "auto" (best offered) or one transport.
TransportMode = Literal["auto", "sse", "nudge", "longpoll", "poll"]


@dataclass(frozen=True)
class History:
    """A read's history signals: relay epoch, and whether envelopes past the cursor were dropped."""

    epoch: str | None
    gap: bool = False
    oldest: int | None = None


FeedItem = Row | GapNotice | History

ModeListener = Callable[[TransportMode], None]


def _history(page: Page) -> History:
    return History(epoch=page.epoch, gap=page.gap, oldest=page.oldest)


async def catch_up_feed(
    client: AsyncRelayClient, workspace: str, after: int
) -> AsyncGenerator[FeedItem, None]:
    """Every retained row past `after`, page by page, until the relay has no more."""
    pos = after
    while True:
        page = await client.fetch(workspace, pos)
        yield _history(page)
        for row in page.rows:
            yield row
            pos = row.seq
        if not page.more or not page.rows:
            return


async def stream_feed(
    client: AsyncRelayClient,
    workspace: str,
    after: int,
    *,
    bodies: bool,
    on_mode: ModeListener,
) -> AsyncGenerator[FeedItem, None]:
    """Rows from the event stream: whole rows when `bodies`, else nudges answered by fetches."""
    pos = after
    async with client.events(workspace, bodies=bodies, after=after if bodies else None) as stream:
        on_mode("sse" if bodies else "nudge")
        # Gap signals come from the events (SSE) or the fetches (nudges), not the hand-shake.
        yield History(epoch=stream.info.epoch)
        if not bodies:
            async for fetched in catch_up_feed(client, workspace, pos):
                if isinstance(fetched, Row):
                    pos = fetched.seq
                yield fetched
        async for item in stream:
            if isinstance(item, Row):
                if item.seq > pos:
                    pos = item.seq
                    yield item
            elif isinstance(item, GapNotice):
                yield item
            elif isinstance(item, Nudge) and item.seq > pos:
                if bodies:
                    # The relay ignored bodies=1 (an older relay): its stream is nudges only.
                    bodies = False
                    on_mode("nudge")
                async for fetched in catch_up_feed(client, workspace, pos):
                    if isinstance(fetched, Row):
                        pos = fetched.seq
                    yield fetched


async def poll_feed(
    client: AsyncRelayClient,
    workspace: str,
    after: int,
    *,
    wait: float,
    poll_interval: float,
    on_mode: ModeListener,
) -> AsyncGenerator[FeedItem, None]:
    """Rows by repeated reads: long-polls of `wait` seconds, or polls every `poll_interval`.

    A relay without long-poll answers `wait=` at once; after such an empty
    answer this feed stops asking and sleeps between reads instead.
    """
    pos = after
    long_poll = wait > 0
    on_mode("longpoll" if long_poll else "poll")
    while True:
        started = time.monotonic()
        page = await client.fetch(workspace, pos, wait=wait if long_poll else None)
        yield _history(page)
        for row in page.rows:
            yield row
            pos = row.seq
        if page.rows:
            continue
        if long_poll and time.monotonic() - started < wait / 2:
            long_poll = False
            on_mode("poll")
        if not long_poll:
            await anyio.sleep(poll_interval)
