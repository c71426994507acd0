"""`SyncWorkspace`: the `Workspace` for programs without an event loop.

A thin facade: the async `Workspace` runs on a private event-loop thread (an
anyio blocking portal) and each method waits for its result. Same rules,
same events, same errors.

    with SyncWorkspace.from_env() as ws:
        ws.send({"kind": "hello"})
        for item in ws.events(live=False):
            print(item)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from client.crypto import Keyring, SealFormat
from client.events import WorkspaceEvent
from client.workspace import Workspace

__all__ = ["SyncWorkspace"]


class SyncWorkspace:
    """Blocking twin of `Workspace`; takes the same arguments (or wraps a `Workspace`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 1 and not kwargs and isinstance(args[0], Workspace):
            self.workspace: Workspace = args[0]
        else:
            self.workspace = Workspace(*args, **kwargs)
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SyncWorkspace:
        """Like `Workspace.from_env`."""
        return cls(Workspace.from_env(environ, **overrides))

    def _loop(self) -> BlockingPortal:
        if self._portal is None:
            self._portal_cm = start_blocking_portal()
            self._portal = self._portal_cm.__enter__()
        return self._portal

    @property
    def keyring(self) -> Keyring:
        return self.workspace.keyring

    @property
    def cursor(self) -> int:
        """The seq of the last envelope handed to the caller."""
        return self.workspace.cursor

    @property
    def relay_epoch(self) -> str | None:
        return self.workspace.relay_epoch

    @property
    def transport(self) -> str | None:
        return self.workspace.transport

    def send(self, obj: Any, *, format: SealFormat | None = None) -> int:
        """Seal and append `obj`; see `Workspace.send`."""
        return self._loop().call(functools.partial(self.workspace.send, obj, format=format))

    def send_many(self, objs: Iterable[Any], *, format: SealFormat | None = None) -> list[int]:
        """Seal and append many objects; see `Workspace.send_many`."""
        return self._loop().call(
            functools.partial(self.workspace.send_many, list(objs), format=format)
        )

    def events(self, *, after: int | None = None, live: bool = True) -> Iterator[WorkspaceEvent]:
        """Opened events and signals; see `Workspace.events`."""
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
        """Close the workspace and stop its event-loop thread."""
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
