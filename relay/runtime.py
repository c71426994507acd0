"""The relay's running parts, built once per app: settings, store, access policy,
hub, limiters, stream slots and metrics. Handlers reach it as `request.app.state.relay`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import Scope

from relay.access import AccessPolicy, AccessState, OpenStreams
from relay.hub import Hub
from relay.limits import (
    RateLimiter,
    StreamSlots,
    client_address,
    client_key,
    normalize_address,
)
from relay.metrics import Metrics
from relay.settings import Settings
from relay.status import Sampler
from relay.store.base import PageCachingStore, Store

if TYPE_CHECKING:
    from relay.reload import Reloader
    from relay.store.journal import Journal
    from relay.tls import CertReloader


@dataclass
class Relay:
    settings: Settings
    store: Store
    policy: AccessPolicy
    hub: Hub
    metrics: Metrics
    push_limiter: RateLimiter
    pair_limiter: RateLimiter
    side_limiter: RateLimiter
    pair_create_limiter: RateLimiter
    slots: StreamSlots
    sampler: Sampler  # the status page's charts
    status_slots: StreamSlots  # the status page's sample streams, apart from `slots`
    started: float = field(default_factory=time.time)
    journal: Journal | None = None  # the memory store's journal, with HIVE_RELAY_DATA_DIR
    access: AccessState | None = None  # what `policy` was built from (None: set in code)
    streams: OpenStreams = field(default_factory=OpenStreams)  # live streams by token
    reloader: Reloader | None = None

    def set_access(self, access: AccessState) -> str:
        """Put a reloaded access state in force and end the live streams it refuses.

        The summary for the reload's log line.
        """
        self.access = access
        self.policy = access.policy()
        ended = self.streams.recheck(self.policy)
        if ended:
            self.metrics.streams_ended_by_reload.inc(ended)
        return f"access {access.describe()}; {ended} live stream(s) ended"

    # The store, when it caches read answers (the memory store; relay.store.base).
    pages: PageCachingStore | None = None
    tls: CertReloader | None = None  # direct TLS, with HIVE_RELAY_TLS_CERT/KEY
    # Headers every answer carries beyond the fixed security set (HSTS over direct TLS).
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def close_streams(self) -> None:
        """Shutdown: every live stream and sample stream ends at its next step."""
        self.hub.close_all()
        self.sampler.close()

    def address(self, scope: Scope) -> str:
        """The client's address (normalized), as the access log shows it."""
        if self._trusted:
            return client_address(scope, self._trusted, self._ip_header)
        # No trusted proxy (the default): the socket peer, as client_address gives it,
        # without its frame (this runs for every access line).
        client = scope.get("client")
        return normalize_address(client[0]) if client else "unknown"

    def peer_address(self, scope: Scope, peer: tuple[str, int] | None) -> str:
        """`address` of a request whose scope is `scope` but whose peer is `peer`."""
        if self._trusted:
            return client_address({**scope, "client": peer}, self._trusted, self._ip_header)
        return normalize_address(peer[0]) if peer else "unknown"

    def client(self, scope: Scope) -> str:
        """What per-client limits count by: the address, an IPv6 one by its network."""
        return client_key(client_address(scope, self._trusted, self._ip_header), self._prefix)

    def __post_init__(self) -> None:
        self._trusted = self.settings.trusted_networks
        self._ip_header = self.settings.client_ip_header.strip().lower().encode("latin-1")
        self._prefix = self.settings.ipv6_prefix
