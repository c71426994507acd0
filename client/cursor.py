"""Where a workspace reader remembers how far it got: the cursor and the relay's history epoch.

`CursorStore` is the seam; `MemoryCursorStore` and `FileCursorStore` (atomic
writes: temp file, fsync, rename) are the two stores shipped. A store holds
the cursor of one or more workspaces by id.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from client.errors import ConfigError

__all__ = ["CursorState", "CursorStore", "FileCursorStore", "MemoryCursorStore"]


@dataclass(frozen=True)
class CursorState:
    """The seq of the last envelope handed over (0: none) and the relay epoch seen with it."""

    seq: int = 0
    relay_epoch: str | None = None


class CursorStore(Protocol):
    """Persist cursors. Methods may block briefly; the workspace calls them off the event loop."""

    def load(self, workspace: str) -> CursorState | None:
        """The saved state of `workspace`, or None when nothing was saved."""
        ...

    def save(self, workspace: str, state: CursorState) -> None:
        """Durably record `state` for `workspace` before returning."""
        ...


class MemoryCursorStore:
    """Cursors in a dict: lost when the process ends. Handy for tests and short-lived readers."""

    def __init__(self) -> None:
        self._states: dict[str, CursorState] = {}

    def load(self, workspace: str) -> CursorState | None:
        return self._states.get(workspace)

    def save(self, workspace: str, state: CursorState) -> None:
        self._states[workspace] = state


class _Saved(msgspec.Struct):
    seq: int
    relay_epoch: str | None = None


class FileCursorStore:
    """Cursors in one JSON file, `{"<workspace>": {"seq": N, "relay_epoch": "…"}}`.

    Every save writes a temp file in the same directory, fsyncs it, renames it
    over the old file and fsyncs the directory: a crash leaves the old cursor
    or the new one, never a torn file. One writer per file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read_all(self) -> dict[str, _Saved]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return msgspec.json.decode(raw, type=dict[str, _Saved])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"cursor file {self.path} is not a cursor file: {exc}") from None

    def load(self, workspace: str) -> CursorState | None:
        saved = self._read_all().get(workspace)
        if saved is None:
            return None
        return CursorState(seq=saved.seq, relay_epoch=saved.relay_epoch)

    def save(self, workspace: str, state: CursorState) -> None:
        states = self._read_all()
        states[workspace] = _Saved(seq=state.seq, relay_epoch=state.relay_epoch)
        data = msgspec.json.encode(states, order="sorted")
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; not every OS lets us open one.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
