"""How each client call maps to an HTTP request, and each answer back to a value or an error.

Shared by `RelayClient` and `AsyncRelayClient` so both speak the protocol
identically; only the sending differs. Nothing here does I/O.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

import httpx
import msgspec
from httpx_sse import ServerSentEvent

from client.errors import (
    BadRequest,
    BadResponse,
    ConfigError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    RelayFull,
    Unauthorized,
    Unavailable,
)
from client.wire import (
    BatchResult,
    DeviceEntry,
    ErrorBody,
    GapNotice,
    Nudge,
    Ok,
    PairingCreated,
    PairingPayload,
    PairingRequest,
    PushResult,
    RawRow,
)

T = TypeVar("T")

# The relay's rule for `{ws}` (PROTOCOL.md; relay/api/common.py applies the same):
# 1-200 of these characters, and not "." or ".." (which URLs would resolve away).
WORKSPACE_ID = re.compile(r"[A-Za-z0-9._~:@-]{1,200}")
WORKSPACE_RULE = "1-200 characters from A-Z a-z 0-9 . _ ~ : @ - (and not . or ..)"
MAX_BATCH = 1000
MAX_WAIT = 60.0
# The relay's rule for a client-chosen idempotency key (PROTOCOL.md; relay/api/envelopes.py
# applies the same): 1-200 visible ASCII characters, 0x21-0x7E. A batch's keys travel
# comma-joined, so a comma in one would split it (the relay then counts too many).
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,200}")
IDEMPOTENCY_KEY_RULE = "1-200 visible ASCII characters (! to ~: no spaces, no accents)"
#: Pages one side-channel read follows at most. Every relay page holds at least one
#: entry, so this is also the most entries such a read can expect page by page
#: (the relay keeps 1000 keyring blobs and 1000 devices by default).
MAX_SIDE_PAGES = 10_000

# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Row:
    """One stored envelope: its relay seq and its body exactly as the relay stores it."""

    seq: int
    body: bytes


@dataclass(frozen=True)
class Page:
    """One read of `/envelopes`: rows oldest first plus the relay's history signals.

    `head`/`oldest` are None when the relay does not send them (a plain Hive
    relay); `epoch` names the relay's history (a change means it may have lost
    envelopes); `gap` says envelopes past the cursor were dropped before being
    read; `more` says the page was cut and more rows wait.
    """

    rows: list[Row]
    head: int | None = None
    oldest: int | None = None
    epoch: str | None = None
    gap: bool = False
    more: bool = False

    @property
    def last_seq(self) -> int | None:
        """The seq of the newest row in this page, or None when empty."""
        return self.rows[-1].seq if self.rows else None


@dataclass(frozen=True)
class StreamInfo:
    """The history headers of an event-stream hand-shake (see `Page`)."""

    head: int | None = None
    oldest: int | None = None
    epoch: str | None = None
    gap: bool = False


#: What an event stream yields: a whole row (`?bodies=1`), a nudge (head moved), or a gap.
StreamItem = Row | Nudge | GapNotice


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request, and how to turn its successful answer into a value."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None
    timeout: httpx.Timeout | None = None


# --------------------------------------------------------------------------- paths


def check_workspace_id(workspace: object) -> str:
    """`workspace` when the relay accepts it as a workspace id, else `ConfigError`."""
    if not isinstance(workspace, str):
        raise ConfigError(f"a workspace id is text, got {type(workspace).__name__}")
    if not WORKSPACE_ID.fullmatch(workspace) or workspace in (".", ".."):
        raise ConfigError(f"invalid workspace id {workspace!r}: {WORKSPACE_RULE}")
    return workspace


def check_base_url(url: object) -> str:
    """The relay base URL without a trailing slash, or `ConfigError` saying what is wrong."""
    if not isinstance(url, str):
        raise ConfigError(f"the relay URL is text, got {type(url).__name__}")
    text = url.strip()
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"the relay URL {text!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        hint = f"; did you mean http://{text}?" if "://" not in text and text else ""
        raise ConfigError(f"the relay URL must start with http:// or https://, got {text!r}{hint}")
    if not parsed.host or "%" in parsed.host:
        raise ConfigError(f"the relay URL {text!r} has no usable host name")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ConfigError(f"the relay URL {text!r} has port {parsed.port}, outside 1-65535")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"the relay URL {text!r} is a base URL: no ?query or #fragment")
    return text.rstrip("/")


def check_idempotency_key(
    key: object, what: str = "an idempotency key", *, in_batch: bool = False
) -> str:
    """`key` when the relay accepts it as an idempotency key, else `ValueError` (nothing sent).

    A batch's keys (`in_batch`) also cannot hold a comma: they travel comma-joined.
    """
    if not isinstance(key, str):
        raise ValueError(f"{what} is text, got {type(key).__name__}")
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ValueError(f"invalid {what} {key!r}: {IDEMPOTENCY_KEY_RULE}")
    if in_batch and "," in key:
        raise ValueError(f"invalid {what} {key!r}: a batch's keys cannot hold a comma")
    return key


def workspace_path(workspace: str, tail: str) -> str:
    check_workspace_id(workspace)
    return f"/v1/workspaces/{quote(workspace, safe='~:@')}/{tail}"


def encode_body(body: Any) -> bytes:
    """Bytes are sent as they are (already JSON); anything else is encoded as JSON."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    return msgspec.json.encode(body)


# --------------------------------------------------------------------------- answers


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


_STATUS_ERRORS: dict[int, type[RelayError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}


def error_from_response(response: httpx.Response, *, token_sent: bool | None = None) -> RelayError:
    """The typed error for a non-2xx answer; the body must already be read.

    `token_sent` (whether the request carried an access token) words a 401.
    """
    status = response.status_code
    code: str | None = None
    message = ""
    try:
        err = msgspec.json.decode(response.content, type=ErrorBody)
        code, message = err.error or None, err.message
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = response.text.strip()[:200]
    if not message:
        message = response.reason_phrase or f"HTTP {status}"
    cls = _STATUS_ERRORS.get(status)
    if status == 413 and code == "relay_full":
        cls = RelayFull
    if cls is None:
        cls = Unavailable if status >= 500 else RelayError
    if cls is Unauthorized and token_sent is not None:
        if token_sent:
            message = f"the relay rejected the access token: {message}"
        else:
            message = "no access token was sent, and this relay requires one"
    error = cls(
        message,
        status=status,
        code=code,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )
    if isinstance(error, Unauthorized):
        error.token_sent = token_sent
    return error


def decode_json(response: httpx.Response, type: type[T]) -> T:
    """Decode and validate a success body in one call; anything else is `BadResponse`."""
    try:
        return msgspec.json.decode(response.content, type=type)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadResponse(
            f"{response.request.method} {response.request.url.path} answered malformed JSON: {exc}",
            status=response.status_code,
        ) from None


def _header_int(response: httpx.Response, name: str) -> int | None:
    raw = response.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadResponse(f"header {name} is not an integer: {raw!r}") from None
    if value < 0:
        raise BadResponse(f"header {name} is negative: {raw!r}")
    return value


def _header_true(response: httpx.Response, name: str) -> bool:
    value: str = response.headers.get(name, "")
    return value.strip().lower() == "true"


def stream_info(response: httpx.Response) -> StreamInfo:
    return StreamInfo(
        head=_header_int(response, "x-relay-head"),
        oldest=_header_int(response, "x-relay-oldest"),
        epoch=response.headers.get("x-relay-epoch") or None,
        gap=_header_true(response, "x-relay-gap"),
    )


def parse_page(response: httpx.Response) -> Page:
    rows = decode_json(response, list[RawRow])
    info = stream_info(response)
    last = -1
    for row in rows:
        if row.seq <= last:
            raise BadResponse("the relay returned rows out of seq order")
        last = row.seq
    return Page(
        rows=[Row(seq=r.seq, body=bytes(r.body)) for r in rows],
        head=info.head,
        oldest=info.oldest,
        epoch=info.epoch,
        gap=info.gap,
        more=_header_true(response, "x-relay-more"),
    )


def parse_health(response: httpx.Response) -> bool:
    return True


def parse_push(response: httpx.Response) -> PushResult:
    return decode_json(response, PushResult)


def parse_batch(response: httpx.Response) -> list[int]:
    return decode_json(response, BatchResult).seqs


def parse_ok(response: httpx.Response) -> None:
    if not decode_json(response, Ok).ok:
        raise BadResponse("the relay answered ok=false", status=response.status_code)


def parse_raw_list(response: httpx.Response) -> list[bytes]:
    return [bytes(blob) for blob in decode_json(response, list[msgspec.Raw])]


def parse_device_map(response: httpx.Response) -> dict[str, Any]:
    return decode_json(response, dict[str, Any])


def parse_pairing(response: httpx.Response) -> PairingCreated:
    return decode_json(response, PairingCreated)


def parse_pairing_payload(response: httpx.Response) -> str:
    return decode_json(response, PairingPayload).payload


def parse_sse(event: ServerSentEvent) -> StreamItem | None:
    """One SSE event as a row, nudge or gap; None for events this SDK does not know."""
    try:
        if event.event == "gap":
            return msgspec.json.decode(event.data, type=GapNotice)
        if event.event != "message" or not event.data:
            return None
        data = event.data.encode("utf-8")
        probe = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
        if "body" in probe:
            row = msgspec.json.decode(data, type=RawRow)
            return Row(seq=row.seq, body=bytes(row.body))
        return msgspec.json.decode(data, type=Nudge)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadResponse(f"malformed event-stream event {event.event!r}: {exc}") from None


# --------------------------------------------------------------------------- calls


def health_call() -> Call[bool]:
    return Call("GET", "/v1/health", parse_health)


def push_call(workspace: str, body: Any, idempotency_key: str | None) -> Call[PushResult]:
    headers = {"content-type": "application/json"}
    if idempotency_key is not None:
        headers["idempotency-key"] = check_idempotency_key(idempotency_key)
    return Call(
        "POST",
        workspace_path(workspace, "envelopes"),
        parse_push,
        headers=headers,
        content=encode_body(body),
    )


def batch_call(
    workspace: str, bodies: Sequence[Any], idempotency_keys: Sequence[str] | None
) -> Call[list[int]]:
    if not 1 <= len(bodies) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1-{MAX_BATCH} bodies, got {len(bodies)}")
    headers = {"content-type": "application/json"}
    if idempotency_keys is not None:
        if len(idempotency_keys) != len(bodies):
            raise ValueError("give exactly one idempotency key per body")
        for n, key in enumerate(idempotency_keys):
            check_idempotency_key(key, f"idempotency key {n}", in_batch=True)
        headers["idempotency-keys"] = ",".join(idempotency_keys)
    content = b"[" + b",".join(encode_body(b) for b in bodies) + b"]"
    return Call(
        "POST",
        workspace_path(workspace, "envelopes/batch"),
        parse_batch,
        headers=headers,
        content=content,
    )


def fetch_call(
    workspace: str,
    after: int,
    limit: int | None,
    wait: float | None,
    base_timeout: httpx.Timeout,
) -> Call[Page]:
    if after < 0:
        raise ValueError("after is a non-negative seq")
    params = {"after": str(after)}
    if limit is not None:
        if not 1 <= limit <= 10_000:
            raise ValueError("limit is 1-10000")
        params["limit"] = str(limit)
    timeout = None
    if wait is not None:
        if not 0 <= wait <= MAX_WAIT:
            raise ValueError(f"wait is 0-{MAX_WAIT:g} seconds")
        params["wait"] = _format_seconds(wait)
        # The relay holds the request up to `wait`: the read timeout must outlast it.
        read = (base_timeout.read or 0.0) + wait
        timeout = httpx.Timeout(
            connect=base_timeout.connect,
            read=read,
            write=base_timeout.write,
            pool=base_timeout.pool,
        )
    return Call(
        "GET", workspace_path(workspace, "envelopes"), parse_page, params=params, timeout=timeout
    )


def _format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _next_page(response: httpx.Response, name: str) -> str | None:
    """The `name` cursor in the answer's `X-Relay-Next`, or None when this was the last page."""
    raw = response.headers.get("x-relay-next")
    if raw is None:
        if _header_true(response, "x-relay-more"):
            raise BadResponse(
                "the relay says more entries wait (X-Relay-More) but sent no X-Relay-Next"
            )
        return None
    key, sep, value = raw.strip().partition("=")
    if key != name or not sep or not value:
        raise BadResponse(f"X-Relay-Next is not {name}=...: {raw!r}")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise BadResponse(f"X-Relay-Next is not percent-encoded UTF-8: {raw!r}") from None


@dataclass(frozen=True)
class KeyringPage:
    """One page of keyring blobs (oldest first) and, when older ones were left off, the
    `before` of the page that holds them."""

    blobs: list[bytes]
    before: int | None


@dataclass(frozen=True)
class DevicePage:
    """One page of a presence/candidate map and the `after` of the next page, if any."""

    entries: dict[str, Any]
    after: str | None


def parse_keyring_page(response: httpx.Response) -> KeyringPage:
    blobs = parse_raw_list(response)
    raw = _next_page(response, "before")
    before = None
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()):
            raise BadResponse(f"X-Relay-Next has a before that is not a count: {raw!r}")
        before = int(raw)
    return KeyringPage(blobs, before)


def parse_device_page(response: httpx.Response) -> DevicePage:
    return DevicePage(parse_device_map(response), _next_page(response, "after"))


def keyring_get_call(workspace: str, before: int | None = None) -> Call[KeyringPage]:
    params = {} if before is None else {"before": str(before)}
    return Call("GET", workspace_path(workspace, "keyring"), parse_keyring_page, params=params)


class KeyringPager:
    """Reads the whole keyring page by page: newest page first, each next one older.

    `call()` is the next request (None when done), `add()` takes its answer, and
    `blobs` is the keyring assembled oldest first. A relay whose `before` does not
    move back, or that needs more than `MAX_SIDE_PAGES` pages, is a `BadResponse`.
    """

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self._pages: list[list[bytes]] = []
        self._before: int | None = None
        self._done = False

    def call(self) -> Call[KeyringPage] | None:
        return None if self._done else keyring_get_call(self.workspace, self._before)

    def add(self, page: KeyringPage) -> None:
        self._pages.append(page.blobs)
        if page.before is None:
            self._done = True
            return
        if page.before == 0 or (self._before is not None and page.before >= self._before):
            raise BadResponse(
                f"the relay's keyring paging does not move back (before={page.before} after "
                f"before={self._before}); stopped reading the keyring"
            )
        if len(self._pages) >= MAX_SIDE_PAGES:
            raise BadResponse(f"the relay's keyring runs past {MAX_SIDE_PAGES} pages; stopped")
        self._before = page.before

    @property
    def blobs(self) -> list[bytes]:
        return [blob for page in reversed(self._pages) for blob in page]


def keyring_post_call(workspace: str, blob: Any) -> Call[None]:
    return Call(
        "POST",
        workspace_path(workspace, "keyring"),
        parse_ok,
        headers={"content-type": "application/json"},
        content=encode_body(blob),
    )


def device_map_get_call(workspace: str, channel: str, after: str | None = None) -> Call[DevicePage]:
    params = {} if after is None else {"after": after}
    return Call("GET", workspace_path(workspace, channel), parse_device_page, params=params)


class DevicePager:
    """Reads a whole presence/candidate map page by page (device ids in code-point order).

    The same interface as `KeyringPager`; `entries` is the merged map. A relay whose
    `after` does not move forward, or that needs more than `MAX_SIDE_PAGES` pages,
    is a `BadResponse`.
    """

    def __init__(self, workspace: str, channel: str) -> None:
        self.workspace = workspace
        self.channel = channel
        self.entries: dict[str, Any] = {}
        self._after: str | None = None
        self._pages = 0
        self._done = False

    def call(self) -> Call[DevicePage] | None:
        return (
            None if self._done else device_map_get_call(self.workspace, self.channel, self._after)
        )

    def add(self, page: DevicePage) -> None:
        self._pages += 1
        self.entries.update(page.entries)
        if page.after is None:
            self._done = True
            return
        if self._after is not None and page.after <= self._after:
            raise BadResponse(
                f"the relay's {self.channel} paging does not move forward (after={page.after!r} "
                f"after after={self._after!r}); stopped reading {self.channel}"
            )
        if self._pages >= MAX_SIDE_PAGES:
            raise BadResponse(
                f"the relay's {self.channel} map runs past {MAX_SIDE_PAGES} pages; stopped"
            )
        self._after = page.after


def device_entry_put_call(workspace: str, channel: str, device_id: str, data: Any) -> Call[None]:
    if not 1 <= len(device_id) <= 200:
        raise ValueError("a device id is 1-200 characters")
    entry = DeviceEntry(data=msgspec.Raw(encode_body(data)), device_id=device_id)
    return Call(
        "POST",
        workspace_path(workspace, channel),
        parse_ok,
        headers={"content-type": "application/json"},
        content=msgspec.json.encode(entry),
    )


def pair_create_call(payload: str, ttl_secs: int | None) -> Call[PairingCreated]:
    return Call(
        "POST",
        "/v1/pair",
        parse_pairing,
        headers={"content-type": "application/json"},
        content=msgspec.json.encode(PairingRequest(payload=payload, ttl_secs=ttl_secs)),
    )


def pair_resolve_call(code: str) -> Call[str]:
    if not code.strip():
        raise ValueError("the pairing code is empty")
    return Call("GET", f"/v1/pair/{quote(code.strip(), safe='')}", parse_pairing_payload)


def events_request(
    workspace: str, bodies: bool, after: int | None
) -> tuple[str, dict[str, str], dict[str, str]]:
    """Path, params and headers of an event-stream request."""
    params: dict[str, str] = {}
    headers: dict[str, str] = {}
    if bodies:
        params["bodies"] = "1"
    if after is not None:
        params["after"] = str(after)
        if bodies:
            # The relay prefers Last-Event-ID; sending both is the same cursor.
            headers["last-event-id"] = str(after)
    return workspace_path(workspace, "events"), params, headers


def is_event_stream(response: httpx.Response) -> bool:
    ctype: str = response.headers.get("content-type", "")
    return ctype.partition(";")[0].strip().lower() == "text/event-stream"
