"""`SyncWorkspace`: the `Workspace` for programs without an event loop.

A thin facade: the async `Workspace` runs on a private event-loop thread (an
anyio blocking portal) and each method waits for its result. Same rules,
same events, same errors.

    with SyncWorkspace.from_env() as ws:
        ws.send({"kind": "hello"})
        for item in ws.events(live=False):
            print(item)

Closing the workspace (leaving the `with` block) ends every `events()`
iteration still open: iterating one afterwards simply stops.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from client.crypto import Device, Keyring, SealFormat, WorkspaceKey
from client.cursor import CursorStore
from client.events import WorkspaceEvent
from client.feeds import TransportMode
from client.http import DEFAULT_MAX_BODY_BYTES, AsyncRelayClient
from client.retry import Backoff
from client.workspace import Workspace

__all__ = ["SyncWorkspace"]


class SyncWorkspace:
    """Blocking twin of `Workspace`: the same arguments, the same methods, waited for.

    See `Workspace` for every argument; `SyncWorkspace.wrap(ws)` drives an
    existing `Workspace` instead.
    """

    def __init__(
        self,
        url: str,
        workspace: str,
        key: Keyring | WorkspaceKey | bytes | str,
        *,
        token: str | None = None,
        key_epoch: int = 0,
        device: Device | None = None,
        cursor_store: CursorStore | None = None,
        seal_format: SealFormat = "hive",
        allow_plaintext: bool = False,
        transport: TransportMode = "auto",
        poll_interval: float = 2.0,
        long_poll_wait: float = 25.0,
        reconnect: Backoff | None = None,
        key_retry: Backoff | None = None,
        send_attempts: int = 5,
        keyring_refresh: float = 0.0,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
        client: AsyncRelayClient | None = None,
    ) -> None:
        self._setup(
            Workspace(
                url,
                workspace,
                key,
                token=token,
                key_epoch=key_epoch,
                device=device,
                cursor_store=cursor_store,
                seal_format=seal_format,
                allow_plaintext=allow_plaintext,
                transport=transport,
                poll_interval=poll_interval,
                long_poll_wait=long_poll_wait,
                reconnect=reconnect,
                key_retry=key_retry,
                send_attempts=send_attempts,
                keyring_refresh=keyring_refresh,
                max_body_bytes=max_body_bytes,
                client=client,
            )
        )

    def _setup(self, workspace: Workspace) -> None:
        #: The async `Workspace` this facade drives.
        self.workspace: Workspace = workspace
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._closed = False
        self._iterations: weakref.WeakSet[Generator[WorkspaceEvent, None, None]] = weakref.WeakSet()

    @classmethod
    def wrap(cls, workspace: Workspace) -> SyncWorkspace:
        """Drive an existing `Workspace` (closed with this facade)."""
        self = cls.__new__(cls)
        self._setup(workspace)
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SyncWorkspace:
        """Like `Workspace.from_env`."""
        return cls.wrap(Workspace.from_env(environ, **overrides))

    def _loop(self) -> BlockingPortal:
        if self._closed:
            raise RuntimeError("this SyncWorkspace is closed")
        if self._portal is None:
            self._portal_cm = start_blocking_portal()
            self._portal = self._portal_cm.__enter__()
        return self._portal

    @property
    def keyring(self) -> Keyring:
        """The keys held, by epoch (see `Workspace.keyring`)."""
        return self.workspace.keyring

    @property
    def cursor(self) -> int:
        """The seq of the last envelope handed to the caller."""
        return self.workspace.cursor

    @property
    def relay_epoch(self) -> str | None:
        """The relay history epoch last seen (None before the first read)."""
        return self.workspace.relay_epoch

    @property
    def transport(self) -> TransportMode | None:
        """The transport in use or last used: sse, nudge, longpoll or poll (None before any)."""
        return self.workspace.transport

    @property
    def closed(self) -> bool:
        """Whether `close()` ran; a closed workspace cannot be used again."""
        return self._closed

    def send(self, obj: Any, *, format: SealFormat | None = None) -> int:
        """Seal and append `obj`; see `Workspace.send`."""
        return self._loop().call(functools.partial(self.workspace.send, obj, format=format))

    def send_many(self, objs: Iterable[Any], *, format: SealFormat | None = None) -> list[int]:
        """Seal and append many objects; see `Workspace.send_many`."""
        return self._loop().call(
            functools.partial(self.workspace.send_many, list(objs), format=format)
        )

    def events(self, *, after: int | None = None, live: bool = True) -> Iterator[WorkspaceEvent]:
        """Opened events and signals; see `Workspace.events`. Ends when the workspace closes."""
        iteration = self._events(after, live)
        self._iterations.add(iteration)
        return iteration

    def _events(self, after: int | None, live: bool) -> Generator[WorkspaceEvent, None, None]:
        if self._closed:
            return
        portal = self._loop()
        agen = self.workspace.events(after=after, live=live)
        try:
            while True:
                try:
                    item = portal.call(agen.__anext__)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if self._portal is portal:  # still running: close the async side there
                portal.call(agen.aclose)

    def __iter__(self) -> Iterator[WorkspaceEvent]:
        return self.events()

    def commit(self) -> None:
        """Persist the cursor now; see `Workspace.commit`."""
        self._loop().call(self.workspace.commit)

    def refresh_keyring(self) -> list[int]:
        """Adopt rotations sealed to this device; see `Workspace.refresh_keyring`."""
        return self._loop().call(self.workspace.refresh_keyring)

    def rotate(self, devices: Mapping[str, X25519PublicKey | bytes | str]) -> int:
        """Rotate to a new key epoch for `devices`; see `Workspace.rotate`."""
        return self._loop().call(self.workspace.rotate, devices)

    def close(self) -> None:
        """End open `events()` iterations, close the workspace and stop its event-loop thread."""
        if self._closed:
            return
        self._closed = True
        for iteration in list(self._iterations):
            # Runs its finally while the loop still runs. (ValueError: it is being
            # iterated in another thread; stopping the loop ends that call.)
            with contextlib.suppress(ValueError):
                iteration.close()
        if self._portal is None or self._portal_cm is None:
            return
        try:
            self._portal.call(self.workspace.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._portal = self._portal_cm = None

    def __enter__(self) -> SyncWorkspace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
