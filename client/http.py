"""`RelayClient` (sync) and `AsyncRelayClient` (async): the relay's HTTP API, one method per call.

Both have the same method names, arguments and errors, like httpx's `Client`
and `AsyncClient` underneath. They move bytes only: bodies go out and come
back exactly as given; sealing and opening is `client.crypto`'s job. Each
client holds one connection pool; use it as a context manager (or call
`close()` / `aclose()`) to release it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource, aconnect_sse, connect_sse

from client import _requests as rq
from client._requests import Call, Page, Row, StreamInfo, StreamItem
from client.errors import (
    ConfigError,
    PayloadTooLarge,
    RelayError,
    Unavailable,
    Unreachable,
    Unsupported,
)
from client.wire import PairingCreated, PushResult

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_TIMEOUT",
    "AsyncEventStream",
    "AsyncRelayClient",
    "EventStream",
    "Page",
    "RelayClient",
    "Row",
    "StreamInfo",
    "StreamItem",
]

T = TypeVar("T")

#: Per-request timeouts: connecting may take 5 s, any other phase 10 s.
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
#: An event stream is idle-checked by the relay's keep-alives (every 25 s by default);
#: a minute without a byte means the connection is dead and worth re-opening.
DEFAULT_STREAM_READ_TIMEOUT = 60.0
#: The relay's default HIVE_RELAY_MAX_BODY_BYTES (4 MiB): request bodies over the
#: client's `max_body_bytes` are refused with `PayloadTooLarge` before sending.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

_USER_AGENT = "hive-relay-client/1"


def _client_options(
    base_url: str,
    token: str | None,
    timeout: float | httpx.Timeout,
    headers: Mapping[str, str] | None,
) -> dict[str, Any]:
    base_url = rq.check_base_url(base_url)
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"the access token is text, got {type(token).__name__}")
    all_headers = {"user-agent": _USER_AGENT, "accept": "application/json"}
    all_headers.update(headers or {})
    if token:
        all_headers["authorization"] = f"Bearer {token}"
    return {
        "base_url": base_url,
        "headers": all_headers,
        "timeout": timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
        "follow_redirects": False,
    }


def _stream_timeout(base: httpx.Timeout, read: float) -> httpx.Timeout:
    return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)


def _check_max_body(max_body_bytes: int | None) -> int | None:
    if max_body_bytes is not None and (
        not isinstance(max_body_bytes, int)
        or isinstance(max_body_bytes, bool)
        or max_body_bytes < 1
    ):
        raise ConfigError(
            f"max_body_bytes is a positive byte count or None, got {max_body_bytes!r}"
        )
    return max_body_bytes


def _precheck(call: Call[Any], max_body_bytes: int | None) -> None:
    """Refuse a body the relay would refuse, before sending any of it."""
    if call.content is None or max_body_bytes is None or len(call.content) <= max_body_bytes:
        return
    raise PayloadTooLarge(
        f"the request body is {len(call.content)} bytes, over the relay's body limit of "
        f"{max_body_bytes} bytes (the client's max_body_bytes); nothing was sent",
        code="payload_too_large",
    )


# A relay that refuses a large body may answer 413 and close while the body is still
# being sent; httpx then reports the broken write, not the answer. Say so.
_LARGE_BODY = 64 * 1024


def _unreachable(
    base_url: str, exc: httpx.TransportError, body: bytes | None = None
) -> Unreachable:
    name = type(exc).__name__
    detail = str(exc).strip()
    reason = f"{name}: {detail}" if detail and detail != name else name
    message = f"cannot reach the relay at {base_url}: {reason}"
    connecting = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if body is not None and len(body) > _LARGE_BODY and not connecting:
        message += (
            f" (while sending a {len(body)}-byte body: if that is over the relay's "
            "HIVE_RELAY_MAX_BODY_BYTES, the relay refused it; set max_body_bytes to that limit)"
        )
    return Unreachable(message)


def _stream_refused(response: httpx.Response, token_sent: bool) -> RelayError | None:
    """Why an event-stream hand-shake cannot be used, or None when it can (body read)."""
    if response.status_code in (404, 405):
        return Unsupported(
            "the relay does not serve this event stream", status=response.status_code
        )
    if not response.is_success:
        return rq.error_from_response(response, token_sent=token_sent)
    if not rq.is_event_stream(response):
        ctype = response.headers.get("content-type", "")
        return Unsupported(
            f"the relay answered {ctype!r}, not an event stream", status=response.status_code
        )
    return None


class EventStream:
    """An open event stream: `info` holds the hand-shake headers; iterate for items."""

    def __init__(self, source: EventSource, base_url: str) -> None:
        self._source = source
        self._base_url = base_url
        self.info: StreamInfo = rq.stream_info(source.response)

    def __iter__(self) -> Iterator[StreamItem]:
        try:
            for event in self._source.iter_sse():
                item = rq.parse_sse(event)
                if item is not None:
                    yield item
        except httpx.TransportError as exc:
            raise _unreachable(self._base_url, exc) from exc


class AsyncEventStream:
    """An open event stream: `info` holds the hand-shake headers; iterate for items."""

    def __init__(self, source: EventSource, base_url: str) -> None:
        self._source = source
        self._base_url = base_url
        self.info: StreamInfo = rq.stream_info(source.response)

    async def __aiter__(self) -> AsyncIterator[StreamItem]:
        try:
            async for event in self._source.aiter_sse():
                item = rq.parse_sse(event)
                if item is not None:
                    yield item
        except httpx.TransportError as exc:
            raise _unreachable(self._base_url, exc) from exc


class RelayClient:
    """Synchronous client of one relay.

    `RelayClient("https://relay.example", token="…")`. Every method raises a
    `RelayError` subclass on failure (`Unauthorized`, `RateLimited`, `Unreachable`…).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        stream_read_timeout: float = DEFAULT_STREAM_READ_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        options = _client_options(base_url, token, timeout, headers)
        self.base_url: str = options["base_url"]
        #: Request bodies over this many bytes raise `PayloadTooLarge` unsent (None: no check).
        self.max_body_bytes = _check_max_body(max_body_bytes)
        self._token_sent = bool(token)
        self._timeout: httpx.Timeout = options["timeout"]
        self._stream_timeout = _stream_timeout(self._timeout, stream_read_timeout)
        self._http = httpx.Client(transport=transport, **options)

    def _send(self, call: Call[T]) -> T:
        _precheck(call, self.max_body_bytes)
        try:
            response = self._http.request(
                call.method,
                call.path,
                params=call.params or None,
                headers=call.headers or None,
                content=call.content,
                timeout=call.timeout or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc, call.content) from exc
        if response.is_success:
            return call.parse(response)
        raise rq.error_from_response(response, token_sent=self._token_sent)

    def _device_map(self, workspace: str, channel: str) -> dict[str, Any]:
        pager = rq.DevicePager(workspace, channel)
        while (call := pager.call()) is not None:
            pager.add(self._send(call))
        return pager.entries

    def health(self) -> bool:
        """True when the relay and its store answer; False on `503 store unavailable`."""
        try:
            return self._send(rq.health_call())
        except Unavailable as exc:
            if exc.status == 503:
                return False
            raise

    def push(self, workspace: str, body: Any, *, idempotency_key: str | None = None) -> PushResult:
        """Append one body (bytes as-is, else encoded as JSON); returns its seq.

        With the same `idempotency_key` a repeated push returns the original seq
        (`duplicate=True`) and appends nothing.
        """
        return self._send(rq.push_call(workspace, body, idempotency_key))

    def push_batch(
        self,
        workspace: str,
        bodies: Sequence[Any],
        *,
        idempotency_keys: Sequence[str] | None = None,
    ) -> list[int]:
        """Append 1-1000 bodies at once (all or nothing); returns their seqs in order."""
        return self._send(rq.batch_call(workspace, bodies, idempotency_keys))

    def fetch(
        self,
        workspace: str,
        after: int = 0,
        *,
        limit: int | None = None,
        wait: float | None = None,
    ) -> Page:
        """Rows with seq > `after`, oldest first, with head/oldest/epoch/gap/more.

        `wait` (0-60 s) long-polls: the relay holds the request until a row arrives.
        """
        return self._send(rq.fetch_call(workspace, after, limit, wait, self._timeout))

    def get_keyring(self, workspace: str) -> list[bytes]:
        """Every retained key-rotation blob, oldest first, as the raw JSON bytes stored.

        A keyring larger than the relay's page follows `X-Relay-Next` to the oldest page.
        """
        pager = rq.KeyringPager(workspace)
        while (call := pager.call()) is not None:
            pager.add(self._send(call))
        return pager.blobs

    def post_keyring(self, workspace: str, blob: Any) -> None:
        """Append a key-rotation blob (bytes as-is, else encoded as JSON)."""
        self._send(rq.keyring_post_call(workspace, blob))

    def get_presence(self, workspace: str) -> dict[str, Any]:
        """`{device_id: data}` for every device that announced presence (every page)."""
        return self._device_map(workspace, "presence")

    def put_presence(self, workspace: str, device_id: str, data: Any) -> None:
        """Replace this device's presence entry with `data` (any JSON value)."""
        self._send(rq.device_entry_put_call(workspace, "presence", device_id, data))

    def get_candidates(self, workspace: str) -> dict[str, Any]:
        """`{device_id: data}` for every device that published candidates (every page)."""
        return self._device_map(workspace, "candidates")

    def put_candidates(self, workspace: str, device_id: str, data: Any) -> None:
        """Replace this device's candidates entry with `data` (any JSON value)."""
        self._send(rq.device_entry_put_call(workspace, "candidates", device_id, data))

    def create_pairing(self, payload: str, *, ttl_secs: int | None = None) -> PairingCreated:
        """Park `payload` under a short pairing code (TTL clamped by the relay to 30-3600 s)."""
        return self._send(rq.pair_create_call(payload, ttl_secs))

    def resolve_pairing(self, code: str) -> str:
        """The payload parked under `code`; `NotFound` when unknown or expired."""
        return self._send(rq.pair_resolve_call(code))

    @contextmanager
    def events(
        self, workspace: str, *, bodies: bool = False, after: int | None = None
    ) -> Iterator[EventStream]:
        """Open the workspace's event stream: nudges, or whole rows with `bodies=True`.

        Raises `Unsupported` when the relay does not offer it.
        """
        path, params, headers = rq.events_request(workspace, bodies, after)
        try:
            with connect_sse(
                self._http,
                "GET",
                path,
                params=params,
                headers=headers,
                timeout=self._stream_timeout,
            ) as source:
                response = source.response
                if not response.is_success or not rq.is_event_stream(response):
                    response.read()
                refused = _stream_refused(response, self._token_sent)
                if refused is not None:
                    raise refused
                yield EventStream(source, self.base_url)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRelayClient:
    """Asynchronous client of one relay; the same methods as `RelayClient`, awaited."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        stream_read_timeout: float = DEFAULT_STREAM_READ_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        options = _client_options(base_url, token, timeout, headers)
        self.base_url: str = options["base_url"]
        #: Request bodies over this many bytes raise `PayloadTooLarge` unsent (None: no check).
        self.max_body_bytes = _check_max_body(max_body_bytes)
        self._token_sent = bool(token)
        self._timeout: httpx.Timeout = options["timeout"]
        self._stream_timeout = _stream_timeout(self._timeout, stream_read_timeout)
        self._http = httpx.AsyncClient(transport=transport, **options)

    async def _send(self, call: Call[T]) -> T:
        _precheck(call, self.max_body_bytes)
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params or None,
                headers=call.headers or None,
                content=call.content,
                timeout=call.timeout or httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc, call.content) from exc
        if response.is_success:
            return call.parse(response)
        raise rq.error_from_response(response, token_sent=self._token_sent)

    async def _device_map(self, workspace: str, channel: str) -> dict[str, Any]:
        pager = rq.DevicePager(workspace, channel)
        while (call := pager.call()) is not None:
            pager.add(await self._send(call))
        return pager.entries

    async def health(self) -> bool:
        """True when the relay and its store answer; False on `503 store unavailable`."""
        try:
            return await self._send(rq.health_call())
        except Unavailable as exc:
            if exc.status == 503:
                return False
            raise

    async def push(
        self, workspace: str, body: Any, *, idempotency_key: str | None = None
    ) -> PushResult:
        """Append one body (bytes as-is, else encoded as JSON); returns its seq.

        With the same `idempotency_key` a repeated push returns the original seq
        (`duplicate=True`) and appends nothing.
        """
        return await self._send(rq.push_call(workspace, body, idempotency_key))

    async def push_batch(
        self,
        workspace: str,
        bodies: Sequence[Any],
        *,
        idempotency_keys: Sequence[str] | None = None,
    ) -> list[int]:
        """Append 1-1000 bodies at once (all or nothing); returns their seqs in order."""
        return await self._send(rq.batch_call(workspace, bodies, idempotency_keys))

    async def fetch(
        self,
        workspace: str,
        after: int = 0,
        *,
        limit: int | None = None,
        wait: float | None = None,
    ) -> Page:
        """Rows with seq > `after`, oldest first, with head/oldest/epoch/gap/more.

        `wait` (0-60 s) long-polls: the relay holds the request until a row arrives.
        """
        return await self._send(rq.fetch_call(workspace, after, limit, wait, self._timeout))

    async def get_keyring(self, workspace: str) -> list[bytes]:
        """Every retained key-rotation blob, oldest first, as the raw JSON bytes stored.

        A keyring larger than the relay's page follows `X-Relay-Next` to the oldest page.
        """
        pager = rq.KeyringPager(workspace)
        while (call := pager.call()) is not None:
            pager.add(await self._send(call))
        return pager.blobs

    async def post_keyring(self, workspace: str, blob: Any) -> None:
        """Append a key-rotation blob (bytes as-is, else encoded as JSON)."""
        await self._send(rq.keyring_post_call(workspace, blob))

    async def get_presence(self, workspace: str) -> dict[str, Any]:
        """`{device_id: data}` for every device that announced presence (every page)."""
        return await self._device_map(workspace, "presence")

    async def put_presence(self, workspace: str, device_id: str, data: Any) -> None:
        """Replace this device's presence entry with `data` (any JSON value)."""
        await self._send(rq.device_entry_put_call(workspace, "presence", device_id, data))

    async def get_candidates(self, workspace: str) -> dict[str, Any]:
        """`{device_id: data}` for every device that published candidates (every page)."""
        return await self._device_map(workspace, "candidates")

    async def put_candidates(self, workspace: str, device_id: str, data: Any) -> None:
        """Replace this device's candidates entry with `data` (any JSON value)."""
        await self._send(rq.device_entry_put_call(workspace, "candidates", device_id, data))

    async def create_pairing(self, payload: str, *, ttl_secs: int | None = None) -> PairingCreated:
        """Park `payload` under a short pairing code (TTL clamped by the relay to 30-3600 s)."""
        return await self._send(rq.pair_create_call(payload, ttl_secs))

    async def resolve_pairing(self, code: str) -> str:
        """The payload parked under `code`; `NotFound` when unknown or expired."""
        return await self._send(rq.pair_resolve_call(code))

    @asynccontextmanager
    async def events(
        self, workspace: str, *, bodies: bool = False, after: int | None = None
    ) -> AsyncIterator[AsyncEventStream]:
        """Open the workspace's event stream: nudges, or whole rows with `bodies=True`.

        Raises `Unsupported` when the relay does not offer it.
        """
        path, params, headers = rq.events_request(workspace, bodies, after)
        try:
            async with aconnect_sse(
                self._http,
                "GET",
                path,
                params=params,
                headers=headers,
                timeout=self._stream_timeout,
            ) as source:
                response = source.response
                if not response.is_success or not rq.is_event_stream(response):
                    await response.aread()
                refused = _stream_refused(response, self._token_sent)
                if refused is not None:
                    raise refused
                yield AsyncEventStream(source, self.base_url)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc

    async def aclose(self) -> None:
        """Release the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRelayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
