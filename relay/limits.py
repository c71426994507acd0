"""Per-client rate buckets, live-stream slots, and the client's address.

Everything here is bounded: a bucket table that would grow past its size is
pruned of full (idle) buckets, then of the oldest.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import time
from collections.abc import Callable, Iterator, Sequence

from starlette.types import Scope

from relay.errors import RelayError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8192)
def normalize_address(text: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 (`::ffff:1.2.3.4`, `::ffff:102:304`)
    as IPv4, IPv6 compressed and in lower case, a zone (`%eth0`) dropped. Not an
    address (a Unix socket peer, "unknown"): unchanged.

    Cached: the access log asks it for every request's peer, and parsing with
    `ipaddress` was about half of what a log line cost (callgrind)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@functools.lru_cache(maxsize=8192)
def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """What per-client limits count by: the IPv4 address, or the IPv6 address's
    network of `ipv6_prefix` bits (one subscriber usually holds a whole /64, and
    can pick any address in it). `address` is as `client_address` returns it."""
    if ":" not in address or ipv6_prefix >= 128:
        return address
    try:
        net = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
    except ValueError:
        return address
    return str(net)


def client_address(scope: Scope, trusted: Sequence[Network], ip_header: bytes = b"") -> str:
    """The socket peer, or the forwarded client when the peer is a trusted proxy.

    From a trusted proxy, `ip_header` (e.g. Fly-Client-IP, which Fly.io's edge
    sets) wins when present and holds an address; otherwise X-Forwarded-For is
    read right to left, skipping trusted proxies, and the first untrusted
    address is the client. Without trusted proxies both headers are ignored.
    """
    client = scope.get("client")
    peer: str = normalize_address(client[0]) if client else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded: list[str] = []
    for name, value in scope.get("headers", ()):
        if ip_header and name == ip_header:
            named: str = value.decode("latin-1").strip()
            if _is_ip(named):
                return normalize_address(named)
        if name == b"x-forwarded-for":
            forwarded += [p.strip() for p in value.decode("latin-1").split(",")]
    for hop in reversed(forwarded):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            return normalize_address(hop) if _is_ip(hop) else peer
    return peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(addr: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in trusted)


class RateLimiter:
    """Token buckets keyed by client: `rate` per second, `burst` on top."""

    def __init__(self, rate: float, burst: int, code: str, what: str, max_clients: int = 100_000):
        self.rate = rate
        self.burst = max(1, burst)
        self.code = code
        self.what = what
        self.max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, client: str, cost: int = 1) -> None:
        """Spend `cost` tokens or raise 429 with Retry-After."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._prune(now)
            bucket = self._buckets[client] = [float(self.burst), now]
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < cost:
            bucket[0] = tokens
            wait = math.ceil((cost - tokens) / self.rate) if cost <= self.burst else 60
            raise RelayError(
                429,
                self.code,
                f"too many {self.what} from this client; retry after {wait} s",
                retry_after=wait,
            )
        bucket[0] = tokens - cost

    def _prune(self, now: float) -> None:
        full = [
            c
            for c, (tok, at) in self._buckets.items()
            if tok + (now - at) * self.rate >= self.burst
        ]
        for c in full:
            del self._buckets[c]
        while len(self._buckets) >= self.max_clients:
            del self._buckets[next(iter(self._buckets))]


class StreamSlots:
    """Counts live streams (SSE, WebSocket, long-poll), globally and per client.

    A stream holds its slot as `with slots.hold(client):` around its whole life,
    so every way it ends (done, disconnect, cancel, error) gives the slot back.
    """

    def __init__(
        self,
        max_total: int,
        max_per_client: int,
        what: str = "live streams",
        code: str = "too_many_streams",
    ) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.what = what
        self.code = code
        self.total = 0
        self._per_client: dict[str, int] = {}
        # Told each refusal's code (the metrics count them for the stream-cap alert).
        self.on_refuse: Callable[[str], None] = lambda code: None

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """A slot for the `with` body; 503 (RelayError) when none is free."""
        self._acquire(client)
        try:
            yield
        finally:
            self._release(client)

    def _acquire(self, client: str) -> None:
        if self.max_total and self.total >= self.max_total:
            self.on_refuse(self.code)
            raise RelayError(
                503,
                self.code,
                f"the relay holds its limit of {self.what}; retry later",
                retry_after=5,
            )
        held = self._per_client.get(client, 0)
        if self.max_per_client and held >= self.max_per_client:
            code = f"{self.code}_for_client"
            self.on_refuse(code)
            raise RelayError(
                503,
                code,
                f"this client holds its limit of {self.what}; close one or retry later",
                retry_after=5,
            )
        self.total += 1
        self._per_client[client] = held + 1

    def _release(self, client: str) -> None:
        self.total -= 1
        held = self._per_client.get(client, 0) - 1
        if held > 0:
            self._per_client[client] = held
        else:
            self._per_client.pop(client, None)
