"""Exponential backoff with jitter, shared by sends, reconnects and key retries."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt `n` (0-based): `initial * factor**n`, capped at `maximum`.

    The delay is scaled by a random factor in `[1 - jitter, 1]` so many clients
    cut off together do not come back together. A server's `Retry-After` is a
    floor: the delay is never shorter than what the relay asked for.
    """

    initial: float = 0.25
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("backoff needs 0 <= initial <= maximum and factor >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter is between 0 and 1")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        delay = base * (1 - self.jitter * random.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.maximum, 300.0)))
        return delay
