"""`Workspace`: join one workspace on one relay, send sealed events and follow opened ones.

    async with Workspace.from_env() as ws:
        await ws.send({"kind": "hello"})
        async for item in ws:
            if isinstance(item, Event):
                print(item.seq, item.data)

The rules it keeps (CLIENT.md):

* `send` seals once and pushes with one idempotency key, reused on every
  retry, so a retried send never appends twice.
* The cursor moves past an envelope only once it was handed to the caller;
  with a cursor store, the stored cursor moves when the caller comes back for
  the next item (or calls `commit()`), so a crash re-delivers at most the
  event being processed.
* An envelope whose key epoch has not arrived stops the cursor: the
  workspace re-reads the keyring (when it has a device identity) and retries;
  it never skips ahead.
* With a device identity, the keyring is read before sealing (by default
  before every send), so a send never seals under an epoch older than the
  newest one the relay holds for this device. Without one, rotations cannot
  be adopted: the workspace warns once when the relay holds a newer epoch.
* A gap or a changed relay epoch reaches the caller as an event.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import msgspec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from client._requests import check_base_url, check_workspace_id
from client.crypto import (
    KEY_SIZE,
    MAX_EPOCH,
    Device,
    Keyring,
    SealFormat,
    WorkspaceKey,
    open_envelope,
    rotation_epoch,
    seal_rotation,
)
from client.cursor import CursorState, CursorStore, FileCursorStore
from client.errors import (
    BadEnvelope,
    ConfigError,
    CryptoError,
    NotSealed,
    PayloadTooLarge,
    RelayError,
    UnknownEpoch,
    Unsupported,
)
from client.events import Event, Gap, KeyMissing, RelayReset, Unopenable, WorkspaceEvent
from client.feeds import (
    FeedItem,
    History,
    TransportMode,
    catch_up_feed,
    poll_feed,
    stream_feed,
)
from client.http import DEFAULT_MAX_BODY_BYTES, AsyncRelayClient, Row
from client.retry import Backoff
from client.wire import GapNotice

__all__ = ["ENV_VARS", "TransportMode", "Workspace"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The environment variables `Workspace.from_env` (and `python -m client`) read.
ENV_VARS = {
    "HIVE_RELAY_URL": "relay base URL, e.g. https://relay.example.com",
    "HIVE_WORKSPACE": "workspace id",
    "HIVE_WORKSPACE_KEY": "workspace key: 64 hex characters, or a passphrase (Argon2id)",
    "HIVE_RELAY_ACCESS_TOKEN": "bearer token, when the relay requires one",
    "HIVE_WORKSPACE_KEY_EPOCH": "key epoch of HIVE_WORKSPACE_KEY (default 0)",
    "HIVE_DEVICE_ID": "this device's id in key rotations (with HIVE_DEVICE_KEY)",
    "HIVE_DEVICE_KEY": "this device's X25519 secret, 64 hex characters",
    "HIVE_CURSOR_FILE": "file to persist the read cursor in",
    "HIVE_RELAY_MAX_BODY_BYTES": "the relay's body limit, checked before sending (default 4194304)",
}

_TRANSPORTS = ("auto", "sse", "nudge", "longpoll", "poll")
# Best first; "auto" walks this list from the last transport that worked.
_PREFERENCE: tuple[TransportMode, ...] = ("sse", "nudge", "longpoll", "poll")
# Without a device nothing can be adopted: the keyring is re-read before a send
# at most this often, only to warn that the relay holds a newer epoch.
_KEYLESS_RECHECK = 60.0


class Workspace:
    """One workspace on one relay, seen through this program's keys.

    Arguments:
        url: the relay's base URL.
        workspace: the workspace id (1-200 of `A-Z a-z 0-9 . _ ~ : @ -`).
        key: a `Keyring`, a `WorkspaceKey`, 32 raw key bytes, or text (64 hex,
            else a passphrase).
        token: bearer token for relays that require one.
        key_epoch: the epoch of `key` when it is a single key (default 0).
        device: this device's identity, to adopt key rotations sealed to it.
        cursor_store: where to persist the cursor (default: memory only).
        seal_format: "hive" (default, readable by Hive devices) or "compact".
        allow_plaintext: hand over unsealed (plaintext) envelopes as events.
        transport: "auto" (best offered) or force one of sse/nudge/longpoll/poll.
        poll_interval: seconds between reads when only plain polling works.
        long_poll_wait: seconds each long-poll read may be held by the relay.
        reconnect: backoff between reconnects after a failure.
        key_retry: backoff between keyring re-reads while a key epoch is missing.
        send_attempts: attempts per send on retryable failures (same idempotency key).
        keyring_refresh: with a `device`, seconds a keyring read stays fresh for
            sending; 0 (default) reads the keyring before every send.
        max_body_bytes: the relay's body limit (default 4 MiB, the relay's
            default); larger sealed bodies raise `PayloadTooLarge` unsent.
            None: no check. Ignored when `client` is given (its own setting).
        client: an `AsyncRelayClient` to use (not closed by this workspace).
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
        if transport not in _TRANSPORTS:
            raise ConfigError(f"transport must be one of {', '.join(_TRANSPORTS)}")
        if seal_format not in ("hive", "compact"):
            raise ConfigError("seal_format must be 'hive' or 'compact'")
        if send_attempts < 1:
            raise ConfigError("send_attempts must be at least 1")
        if not 0 < long_poll_wait <= 60:
            raise ConfigError("long_poll_wait must be in (0, 60] seconds")
        if poll_interval <= 0:
            raise ConfigError("poll_interval must be positive")
        if keyring_refresh < 0:
            raise ConfigError("keyring_refresh must be 0 (read before every send) or more seconds")
        check_workspace_id(workspace)
        if device is not None and not isinstance(device, Device):
            raise ConfigError(f"device must be a Device, got {type(device).__name__}")
        self.keyring = _keyring(key, key_epoch)
        self.client = client or AsyncRelayClient(url, token, max_body_bytes=max_body_bytes)
        self._owns_client = client is None
        self.workspace = workspace
        self.device = device
        self.cursor_store = cursor_store
        self.seal_format: SealFormat = seal_format
        self.allow_plaintext = allow_plaintext
        self.poll_interval = poll_interval
        self.long_poll_wait = long_poll_wait
        self.reconnect = reconnect or Backoff()
        self.key_retry = key_retry or Backoff(initial=1.0, maximum=60.0)
        self.send_attempts = send_attempts
        self.keyring_refresh = keyring_refresh
        self._keyring_lock = anyio.Lock()
        self._keyring_reads_started = 0
        self._keyring_read_done = 0  # the start number of the newest completed read
        self._keyring_read_at: float | None = None  # when that read started (monotonic)
        self._warned_behind = False
        self._requested_transport: TransportMode = transport
        self._detected: TransportMode | None = None
        self._cursor = 0
        self._relay_epoch: str | None = None
        self._loaded = False
        self._stored: CursorState | None = None
        self._reported_gap: tuple[int, int | None] | None = None
        self._generation = 0
        self._announced: TransportMode | None = None  # the transport last logged as connected

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Workspace:
        """Build from `HIVE_RELAY_URL`, `HIVE_WORKSPACE`, `HIVE_WORKSPACE_KEY` and friends.

        Keyword `overrides` (the constructor's arguments: url, workspace, key,
        token, key_epoch, device, cursor_store, …) win over the environment.
        See `ENV_VARS` for every variable read.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def required(arg: str, name: str) -> Any:
            if arg in overrides:
                return overrides.pop(arg)
            value = get(name)
            if value is None:
                raise ConfigError(f"{name} is not set ({ENV_VARS[name]})")
            return value

        def named(name: str, check: Callable[[str], T], value: str) -> T:
            try:
                return check(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None

        url_from_env, ws_from_env = "url" not in overrides, "workspace" not in overrides
        url = required("url", "HIVE_RELAY_URL")
        if url_from_env:
            url = named("HIVE_RELAY_URL", check_base_url, url)
        workspace = required("workspace", "HIVE_WORKSPACE")
        if ws_from_env:
            named("HIVE_WORKSPACE", check_workspace_id, workspace)
        # The key is read raw: a passphrase may have meaningful surrounding spaces.
        if "key" in overrides:
            key = overrides.pop("key")
        elif env.get("HIVE_WORKSPACE_KEY"):
            key = named("HIVE_WORKSPACE_KEY", WorkspaceKey.parse, env["HIVE_WORKSPACE_KEY"])
        else:
            raise ConfigError(f"HIVE_WORKSPACE_KEY is not set ({ENV_VARS['HIVE_WORKSPACE_KEY']})")
        overrides.setdefault("token", get("HIVE_RELAY_ACCESS_TOKEN"))
        if "max_body_bytes" not in overrides and get("HIVE_RELAY_MAX_BODY_BYTES") is not None:
            overrides["max_body_bytes"] = parse_max_body(
                get("HIVE_RELAY_MAX_BODY_BYTES") or "", "HIVE_RELAY_MAX_BODY_BYTES"
            )
        if "key_epoch" not in overrides and get("HIVE_WORKSPACE_KEY_EPOCH") is not None:
            overrides["key_epoch"] = parse_epoch(
                get("HIVE_WORKSPACE_KEY_EPOCH") or "", "HIVE_WORKSPACE_KEY_EPOCH"
            )
        if "device" not in overrides:
            overrides["device"] = device_from_env(env)
        if "cursor_store" not in overrides and get("HIVE_CURSOR_FILE"):
            overrides["cursor_store"] = FileCursorStore(get("HIVE_CURSOR_FILE") or "")
        try:
            return cls(url, workspace, key, **overrides)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from None

    async def aclose(self) -> None:
        """Close the HTTP client (when this workspace made it)."""
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Workspace:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ state

    @property
    def cursor(self) -> int:
        """The seq of the last envelope handed to the caller (0 before any)."""
        return self._cursor

    @property
    def relay_epoch(self) -> str | None:
        """The relay history epoch last seen (None before the first read)."""
        return self._relay_epoch

    @property
    def transport(self) -> TransportMode | None:
        """The transport in use or last used: sse, nudge, longpoll or poll (None before any)."""
        return self._detected

    # ------------------------------------------------------------------ sending

    def seal(self, obj: Any, *, format: SealFormat | None = None) -> bytes:
        """The sealed body for `obj` (JSON-encoded; `bytes` are taken as JSON text as-is).

        Seals with the keys held now; `send` re-reads the keyring first.
        """
        return self._seal(_plaintext(obj), format)

    def _seal(self, plaintext: bytes, format: SealFormat | None) -> bytes:
        return self.keyring.seal(
            plaintext, format=format or self.seal_format, workspace=self.workspace
        )

    def _check_size(self, plaintext: bytes, body: bytes, limit: int | None, what: str) -> None:
        if limit is None or len(body) <= limit:
            return
        raise PayloadTooLarge(
            f"{what} is {len(plaintext)} bytes of JSON, which seals to {len(body)} bytes, over "
            f"the relay's body limit of {limit} bytes; nothing was sent. A Hive-format "
            "body is about 3.6 times its plaintext: send less per event (or the compact format, "
            "about 1.34 times, when every member runs this SDK)",
            code="payload_too_large",
        )

    async def send(self, obj: Any, *, format: SealFormat | None = None) -> int:
        """Seal `obj` with the newest key and append it; returns its seq.

        Retryable failures (unreachable, 503, 429) are retried with backoff,
        re-sending the same sealed bytes under the same idempotency key, so the
        relay appends it once however often the answer was lost.
        """
        plaintext = _plaintext(obj)
        await self._keys_for_sending()
        body = self._seal(plaintext, format)
        self._check_size(plaintext, body, self.client.max_body_bytes, "the event")
        key = uuid.uuid4().hex
        result = await self._retrying(
            lambda: self.client.push(self.workspace, body, idempotency_key=key)
        )
        return result.seq

    async def send_many(
        self, objs: Iterable[Any], *, format: SealFormat | None = None
    ) -> list[int]:
        """Seal and append many objects; returns their seqs in order.

        Sent in batches of up to 1000 that each fit the relay's body limit
        (`PayloadTooLarge`, before anything is sent, when one object alone does
        not). Each batch is all or nothing; a failure leaves earlier batches
        appended.
        """
        plaintexts = [_plaintext(obj) for obj in objs]
        if not plaintexts:
            return []
        await self._keys_for_sending()
        bodies = [self._seal(p, format) for p in plaintexts]
        limit = self.client.max_body_bytes
        for n, (plaintext, body) in enumerate(zip(plaintexts, bodies, strict=True)):
            self._check_size(plaintext, body, limit, f"object {n}")
        seqs: list[int] = []
        for chunk in _batches(bodies, limit):
            keys = [uuid.uuid4().hex for _ in chunk]
            if len(chunk) == 1:  # also fits when the batch's brackets would not
                push = functools.partial(
                    self.client.push, self.workspace, chunk[0], idempotency_key=keys[0]
                )
                seqs.append((await self._retrying(push)).seq)
                continue
            seqs += await self._retrying(
                functools.partial(
                    self.client.push_batch, self.workspace, chunk, idempotency_keys=keys
                )
            )
        return seqs

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for n in range(self.send_attempts):
            try:
                return await attempt()
            except RelayError as exc:
                if not exc.retryable or n + 1 == self.send_attempts:
                    raise
                delay = self.reconnect.delay(n, exc.retry_after)
                log.info("send failed (%s); retrying in %.2fs", exc, delay)
                await anyio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ keys

    async def refresh_keyring(self) -> list[int]:
        """Re-read the keyring and adopt every rotation sealed to this device; new epochs.

        Without a `device` nothing can be adopted: the read only checks whether
        the relay holds a newer epoch than the key in use (and warns once).
        """
        self._keyring_reads_started += 1
        ticket = self._keyring_reads_started
        started = time.monotonic()
        blobs = await self.client.get_keyring(self.workspace)
        added: list[int] = []
        if self.device is not None:
            added = self.keyring.add_rotations(blobs, self.device)
        if ticket > self._keyring_read_done:
            self._keyring_read_done, self._keyring_read_at = ticket, started
        if added:
            log.info("adopted key epochs %s from the keyring", added)
        self._warn_if_behind(blobs)
        return added

    async def _keys_for_sending(self) -> None:
        """Make sure the keyring was read recently enough to seal (see `keyring_refresh`).

        Concurrent sends share one read, but only a read that started after
        this send was asked for: a rotation acknowledged before that is seen.
        """
        if self.device is None:
            if self._warned_behind:
                return
            interval = _KEYLESS_RECHECK
        else:
            interval = self.keyring_refresh
        ticket = self._keyring_reads_started
        read_at = self._keyring_read_at
        if read_at is not None and time.monotonic() - read_at < interval:
            return
        async with self._keyring_lock:
            if self._keyring_read_done > ticket:
                return  # a read that began after this send was asked for has finished
            await self._retrying(self.refresh_keyring)

    def _warn_if_behind(self, blobs: Iterable[bytes]) -> None:
        if self._warned_behind:
            return
        newest = -1
        for blob in blobs:
            try:
                newest = max(newest, rotation_epoch(blob))
            except CryptoError:
                continue
        current = self.keyring.current_epoch
        if newest <= current:
            return
        self._warned_behind = True
        if self.device is None:
            log.warning(
                "the relay's keyring for workspace %r holds key epoch %d, newer than the key "
                "in use (epoch %d). Without a device key this program cannot adopt key "
                "rotations: it keeps sealing under epoch %d, which members removed by a "
                "rotation can still open. Give it its device identity (device=, or "
                "HIVE_DEVICE_ID and HIVE_DEVICE_KEY) so it adopts the rotations sealed to it.",
                self.workspace,
                newest,
                current,
                current,
            )
        else:
            log.warning(
                "the relay's keyring for workspace %r holds key epoch %d, which is not sealed "
                "to device %r: this device was probably removed from the workspace, and it "
                "keeps sealing under epoch %d, which the remaining members may no longer read.",
                self.workspace,
                newest,
                self.device.device_id,
                current,
            )

    async def rotate(self, devices: Mapping[str, X25519PublicKey | bytes | str]) -> int:
        """Make a new key epoch, seal it to `devices` and post it to the keyring; returns it.

        `devices` maps device id to X25519 public key and must list every device
        that stays (including this one, to adopt it elsewhere); a device left
        out cannot open what is sealed from now on. This workspace seals with
        the new key immediately.
        """
        published = 0
        for blob in await self.client.get_keyring(self.workspace):
            try:
                published = max(published, rotation_epoch(blob))
            except CryptoError:
                continue
        epoch = max(self.keyring.current_epoch, published) + 1
        key = WorkspaceKey.generate()
        await self.client.post_keyring(self.workspace, seal_rotation(key, epoch, devices))
        self.keyring.add(epoch, key)
        return epoch

    # ------------------------------------------------------------------ cursor

    async def _load_cursor(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.cursor_store is not None:
            state = await anyio.to_thread.run_sync(self.cursor_store.load, self.workspace)
            if state is not None:
                self._cursor, self._relay_epoch = state.seq, state.relay_epoch
                self._stored = state

    async def commit(self) -> None:
        """Persist the cursor now (it is also persisted each time the caller asks for more)."""
        state = CursorState(seq=self._cursor, relay_epoch=self._relay_epoch)
        if self.cursor_store is None or state == self._stored:
            return
        await anyio.to_thread.run_sync(self.cursor_store.save, self.workspace, state)
        self._stored = state

    # ------------------------------------------------------------------ following

    def __aiter__(self) -> AsyncIterator[WorkspaceEvent]:
        return self.events()

    async def events(
        self, *, after: int | None = None, live: bool = True
    ) -> AsyncGenerator[WorkspaceEvent, None]:
        """Opened events and signals in seq order, from the cursor (or `after`) on.

        `live=True` follows forever over the best transport, reconnecting with
        backoff; `live=False` ends once caught up (or at a missing key epoch).
        Raises `RelayError` only for failures a retry cannot fix (401, 403…).

        One cursor, one reader: a newer `events()` iteration supersedes older
        ones, which raise `RuntimeError` if resumed. (Leaving a loop with
        `break` is therefore enough; no need to close the iterator first.)
        """
        self._generation += 1
        generation = self._generation
        async with aclosing(self._events(after, live)) as inner:
            async for event in inner:
                self._check_generation(generation)
                yield event
                self._check_generation(generation)

    def _check_generation(self, generation: int) -> None:
        if generation != self._generation:
            raise RuntimeError("a newer events() iteration of this workspace superseded this one")

    async def _events(self, after: int | None, live: bool) -> AsyncGenerator[WorkspaceEvent, None]:
        await self._load_cursor()
        if after is not None:
            if after < 0:
                raise ValueError("after is a non-negative seq")
            self._cursor = after
        failures = 0
        reported_stall: int | None = None
        while True:
            stalled: KeyMissing | None = None
            try:
                async with aclosing(self._feed(live)) as feed:
                    async for item in feed:
                        failures = 0
                        for event in await self._handle(item):
                            if isinstance(event, KeyMissing):
                                stalled = event
                                break
                            self._hand_over(event)
                            yield event
                            await self.commit()
                        if stalled is not None:
                            break
            except RelayError as exc:
                if not exc.retryable or not live:
                    raise
                self._detected = None if self._requested_transport == "auto" else self._detected
                self._announced = None
                delay = self.reconnect.delay(failures, exc.retry_after)
                failures += 1
                log.info("reconnecting in %.1f s: %s", delay, exc)
                await anyio.sleep(delay)
                continue
            if stalled is None:
                if not live:
                    return
                # The stream ended cleanly (relay restart, slow-consumer cut): resume.
                self._announced = None
                delay = self.reconnect.delay(failures)
                failures += 1
                log.info("reconnecting in %.1f s: the relay ended the stream", delay)
                await anyio.sleep(delay)
                continue
            if reported_stall != stalled.seq:
                reported_stall = stalled.seq
                yield stalled
            if not live:
                return
            await self._wait_for_key(stalled)

    async def _wait_for_key(self, stalled: KeyMissing) -> None:
        attempt = 0
        if stalled.epoch not in self.keyring:
            how = "re-reading the keyring" if self.device is not None else "no device key"
            log.info(
                "waiting at seq %d for key epoch %d (%s); nothing after it is delivered",
                stalled.seq,
                stalled.epoch,
                how,
            )
        while stalled.epoch not in self.keyring:
            await anyio.sleep(self.key_retry.delay(attempt))
            attempt += 1
            if self.device is None:
                continue  # only a key added by hand (keyring.add) can end the wait
            try:
                await self.refresh_keyring()
            except RelayError as exc:
                if not exc.retryable:
                    raise
                log.info("keyring read failed (%s); retrying", exc)

    def _hand_over(self, event: WorkspaceEvent) -> None:
        if isinstance(event, Event | Unopenable):
            self._cursor = event.seq

    def _feed(self, live: bool) -> AsyncGenerator[FeedItem, None]:
        after = self._cursor
        if not live:
            return catch_up_feed(self.client, self.workspace, after)
        return self._live_feed(after)

    def _set_mode(self, mode: TransportMode) -> None:
        self._detected = mode
        if mode != self._announced:
            self._announced = mode
            log.info("connected: following workspace %r live over %s", self.workspace, mode)

    async def _live_feed(self, after: int) -> AsyncGenerator[FeedItem, None]:
        requested = self._requested_transport
        order: tuple[TransportMode, ...]
        if requested != "auto":
            order = (requested,)
        elif self._detected is None:
            order = _PREFERENCE
        else:
            order = _PREFERENCE[_PREFERENCE.index(self._detected) :]
        for mode in order:
            try:
                if mode in ("sse", "nudge"):
                    feed = stream_feed(
                        self.client,
                        self.workspace,
                        after,
                        bodies=mode == "sse",
                        on_mode=self._set_mode,
                    )
                else:
                    feed = poll_feed(
                        self.client,
                        self.workspace,
                        after,
                        wait=self.long_poll_wait if mode == "longpoll" else 0,
                        poll_interval=self.poll_interval,
                        on_mode=self._set_mode,
                    )
                async with aclosing(feed):
                    async for item in feed:
                        yield item
                return
            except Unsupported:
                if requested != "auto":
                    raise
                log.info("the relay does not offer the %s transport; trying the next", mode)
        raise Unsupported("the relay offers no transport this client can follow")

    # ------------------------------------------------------------------ opening

    async def _handle(self, item: FeedItem) -> list[WorkspaceEvent]:
        if isinstance(item, History):
            events: list[WorkspaceEvent] = []
            reset = self._note_epoch(item.epoch)
            if reset is not None:
                events.append(reset)
            if item.gap:
                events += self._gap(item.oldest)
            return events
        if isinstance(item, GapNotice):
            return self._gap(item.oldest)
        if item.seq <= self._cursor:
            return []  # already handed over (a replay after reconnecting)
        return [await self._open(item)]

    def _note_epoch(self, epoch: str | None) -> RelayReset | None:
        if epoch is None:
            return None
        previous, self._relay_epoch = self._relay_epoch, epoch
        if previous is not None and previous != epoch:
            return RelayReset(previous=previous, current=epoch)
        return None

    def _gap(self, oldest: int | None) -> list[WorkspaceEvent]:
        mark = (self._cursor, oldest)
        if mark == self._reported_gap:
            return []
        self._reported_gap = mark
        return [Gap(after=self._cursor, oldest=oldest)]

    async def _open(self, row: Row) -> WorkspaceEvent:
        try:
            try:
                opened = open_envelope(row.body, self.keyring, workspace=self.workspace)
            except UnknownEpoch as exc:
                if self.device is not None:
                    await self.refresh_keyring()
                if exc.epoch not in self.keyring:
                    return KeyMissing(seq=row.seq, epoch=exc.epoch)
                opened = open_envelope(row.body, self.keyring, workspace=self.workspace)
            plaintext, key_epoch = opened.plaintext, opened.epoch
        except NotSealed as exc:
            if not self.allow_plaintext:
                return Unopenable(seq=row.seq, error=exc, body=row.body)
            plaintext, key_epoch = row.body, None
        except CryptoError as exc:
            return Unopenable(seq=row.seq, error=exc, body=row.body)
        try:
            data = msgspec.json.decode(plaintext)
        except msgspec.DecodeError:
            error = BadEnvelope("the opened plaintext is not JSON")
            return Unopenable(seq=row.seq, error=error, body=row.body)
        return Event(seq=row.seq, data=data, key_epoch=key_epoch, plaintext=plaintext)


def _plaintext(obj: Any) -> bytes:
    if isinstance(obj, bytes | bytearray | memoryview):
        plaintext = bytes(obj)
        try:
            msgspec.json.decode(plaintext)
        except msgspec.DecodeError as exc:
            raise ValueError(f"send() got bytes that are not JSON: {exc}") from None
        return plaintext
    return msgspec.json.encode(obj)


def _batches(bodies: list[bytes], limit: int | None) -> Iterator[list[bytes]]:
    """Runs of at most 1000 bodies whose batch request (`[a,b,...]`) fits `limit`."""
    chunk: list[bytes] = []
    size = 1  # "[" and "]" less the first comma
    for body in bodies:
        grown = size + len(body) + 1
        if chunk and (len(chunk) == 1000 or (limit is not None and grown > limit)):
            yield chunk
            chunk, grown = [], 1 + len(body) + 1
        chunk.append(body)
        size = grown
    if chunk:
        yield chunk


def _keyring(key: object, key_epoch: int) -> Keyring:
    """The keyring a `Workspace`'s `key` argument stands for, or `ConfigError`."""
    if isinstance(key, Keyring):
        if len(key) == 0:
            raise ConfigError("the keyring is empty: a workspace needs at least one key")
        return key
    try:
        _check_epoch_arg(key_epoch)
        if isinstance(key, WorkspaceKey):
            return Keyring.single(key, key_epoch)
        if isinstance(key, bytes | bytearray | memoryview):
            raw = bytes(key)
            if len(raw) != KEY_SIZE:
                raise ConfigError(
                    f"a bytes key is the {KEY_SIZE} raw key bytes, got {len(raw)} bytes "
                    "(pass a str for 64 hex characters or a passphrase)"
                )
            return Keyring.single(WorkspaceKey(raw), key_epoch)
        if isinstance(key, str):
            return Keyring.single(WorkspaceKey.parse(key), key_epoch)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"key: {exc}") from None
    raise ConfigError(
        "key must be a Keyring, a WorkspaceKey, 32 raw bytes, or a str (64 hex characters or "
        f"a passphrase), got {type(key).__name__}"
    )


def _check_epoch_arg(epoch: object) -> None:
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= MAX_EPOCH:
        raise ConfigError(f"key_epoch must be a whole number in 0..{MAX_EPOCH}, got {epoch!r}")


def parse_epoch(text: str, name: str) -> int:
    """A key epoch from the setting `name` (a variable or flag), or `ConfigError` naming it."""
    try:
        epoch = int(text.strip())
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a whole number") from None
    if not 0 <= epoch <= MAX_EPOCH:
        raise ConfigError(f"{name} must be in 0..{MAX_EPOCH}, got {epoch}")
    return epoch


def parse_max_body(text: str, name: str) -> int | None:
    """A body limit in bytes from the setting `name`; `0` means no client-side check."""
    try:
        limit = int(text.strip())
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a whole number of bytes") from None
    if limit < 0:
        raise ConfigError(f"{name} is a byte count (0: no check), got {limit}")
    return limit or None


def device_from_env(
    env: Mapping[str, str],
    *,
    id_name: str = "HIVE_DEVICE_ID",
    key_name: str = "HIVE_DEVICE_KEY",
) -> Device | None:
    """This device's identity from `HIVE_DEVICE_ID` and `HIVE_DEVICE_KEY`, or None.

    `id_name`/`key_name` are how the user set them (variables or flags), for messages.
    """
    device_id = env.get("HIVE_DEVICE_ID", "").strip()
    secret = env.get("HIVE_DEVICE_KEY", "").strip()
    if not device_id and not secret:
        return None
    if not device_id or not secret:
        missing = key_name if device_id else id_name
        given = id_name if device_id else key_name
        raise ConfigError(f"{given} is set but {missing} is not: set both, or neither")
    try:
        return Device.from_hex(device_id, secret)
    except ValueError as exc:
        raise ConfigError(f"{key_name}: {exc}") from None
