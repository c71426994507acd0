"""A response body held as several buffers, sent with one vectored write.

A big page of the memory store is a few slices of its row chunks
(relay.store.memory); joining them into one bytes object would copy every byte
once more before the socket copies it again. The relay's HTTP protocol
(relay.server) announces in each request's scope that it writes a `Buffers`
body as it is (`writelines`, no join); under any other ASGI server an endpoint
sends `Buffers.join()`, plain bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The key in scope["extensions"] that relay.server sets.
VECTORED = "relay.vectored_body"

Buffer = bytes | memoryview


class Buffers:
    """A body as its pieces; len() is its size in bytes, as uvicorn asks."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def join(self) -> bytes:
        return b"".join(self.parts)


def vectored(scope: Mapping[str, Any]) -> bool:
    """Whether the server of this request writes a `Buffers` body itself."""
    ext = scope.get("extensions")
    return ext is not None and VECTORED in ext
