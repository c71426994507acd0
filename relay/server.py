"""uvicorn protocols with the limits uvicorn lacks, and one send per small answer.

* A request head must arrive whole within `head_timeout` seconds of the connection
  opening (or of the previous response), and a started body may not stall longer
  than that between chunks: a slowloris is closed, not kept for ever.
* A request head may not grow past `head_limit` bytes while it arrives: 431 and
  close, before uvicorn's parser buffers (and re-copies) an endless header.
* Parser errors are answered with the relay's JSON error shape and security headers.
* A WebSocket hand-shake the websockets library refuses is answered (uvicorn's
  sans-I/O protocol leaves the library's 4xx unsent).
* A WebSocket stops reading while its output is blocked (`_ReadGate`): a peer that
  sends and never reads (pings, invalid frames) cannot queue more than the
  transport's high-water mark plus one read's replies, and a socket closed with
  output its peer never takes is aborted after `close_grace` seconds instead of
  holding that output for ever.
* An answer's head leaves with its body in one send, not two (`_HeadWithBody`),
  and a body given as several buffers (relay.wire) is written as they are.
* A GET the app can answer from prebuilt bytes (a cached read: its header
  lines built once per page) is answered as its head is parsed, without an ASGI
  task, and written whole, status line to body, without uvicorn assembling and
  checking the same head for every reader (`RelayHttpProtocol._start_asgi_task`,
  `Front.answer_now`). Everything else runs the app as uvicorn would.
* An answer given before its request's body has all arrived (a 413, 401, 400…)
  never lets the rest of that body be read as a request: the rest of a short
  body (at most `drain_limit` bytes by Content-Length) is read and discarded and
  the connection stays open; otherwise the answer says `connection: close` and
  the connection closes after it, discarding (not parsing) what the client
  still sends.
* The head-size guard counts the bytes of the head in progress only, not the
  requests pipelined before it in the same read.
* The relay's own error answers (431, 400) come after the answers still owed to
  requests pipelined before the bad one, never in their place.
* A close after an answer is a lingering close (FIN, then discard the client's
  late bytes for a while): a client still sending gets the answer, not a reset.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
)
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from relay.errors import SECURITY_HEADERS, headers_too_large
from relay.wire import VECTORED, Buffers

_SECURITY = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items())


def _error_bytes(status: int, reason: bytes, code: str, message: str) -> bytes:
    body = msgspec.json.encode({"error": code, "message": message})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n%s\r\n%s" % (status, reason, len(body), _SECURITY, body)
    )


class _ReadGate:
    """The transport as uvicorn's WebSocket protocol sees it.

    uvicorn pauses reading while the app has a message it has not taken, and
    resumes when it takes it; control frames (a ping's pong) are answered
    straight into the transport whatever its buffer holds. The gate keeps
    reading paused while either reason holds: the app is behind, or the
    transport's write buffer is above its high-water mark (`write_blocked`,
    set from the protocol's pause_writing / resume_writing).

    `close()` with output still buffered (a peer that does not read) aborts the
    connection after `grace` seconds: asyncio would otherwise wait for ever for
    the buffer to drain before it lets go of the connection and what it holds.
    """

    __slots__ = ("_abort_timer", "_paused", "_transport", "app_paused", "grace", "write_blocked")

    def __init__(self, transport: asyncio.Transport, grace: float) -> None:
        self._transport = transport
        self._paused = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self.app_paused = False
        self.write_blocked = False
        self.grace = grace

    def pause_reading(self) -> None:
        self.app_paused = True
        self.sync()

    def resume_reading(self) -> None:
        self.app_paused = False
        self.sync()

    def sync(self) -> None:
        want = self.app_paused or self.write_blocked
        if want == self._paused or self._transport.is_closing():
            return
        self._paused = want
        if want:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    def close(self) -> None:
        self._transport.close()
        if self._abort_timer is None and self._transport.get_write_buffer_size():
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(self.grace, self._transport.abort)

    def lost(self) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    close_grace = 5.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._gate = _ReadGate(transport, self.close_grace)
        self.transport = self._gate  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._gate.lost()

    # At shutdown the relay ends its own live streams first (close 1001 "relay
    # shutting down"); uvicorn's 1012 for an open socket waits this long, so the
    # relay's close, already on its way, is the one the client gets. uvicorn's
    # graceful shutdown waits for the connections meanwhile.
    shutdown_grace = 1.0

    def shutdown(self) -> None:
        if self.handshake_complete and not self.close_sent and not self.transport.is_closing():
            self.loop.call_later(self.shutdown_grace, self._shutdown_now)
            return
        super().shutdown()

    def _shutdown_now(self) -> None:
        if not self.transport.is_closing():
            super().shutdown()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._gate.write_blocked = True
        self._gate.sync()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._gate.write_blocked = False
        self._gate.sync()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()


_STATUS_200 = STATUS_LINE[200]
# uvicorn's default headers (the date, once a second) as header lines: (list, lines).
_defaults: tuple[object, bytes] = ((), b"")


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The header lines of a prebuilt 200 answer, checked and lowered once, as
    uvicorn checks and lowers them for every answer it sends. The answer's framing
    is uvicorn's: Content-Length must be among them, Connection and
    Transfer-Encoding may not."""
    out: list[bytes] = []
    length = False
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            raise ValueError(f"invalid header {name!r}")
        name = name.lower()
        if name in (b"connection", b"transfer-encoding"):
            raise ValueError(f"{name!r} is the server's to set")
        length = length or name == b"content-length"
        out += (name, b": ", value, b"\r\n")
    if not length:
        raise ValueError("a prebuilt answer needs its content-length")
    return b"".join(out)


def _answer_head(defaults: list[tuple[bytes, bytes]], lines: bytes, keep: bool) -> bytes:
    """The head of a prebuilt 200 answer: status line, uvicorn's default headers
    (the date), the page's `lines`, and the end (with connection: close unless
    `keep`)."""
    return b"".join(
        (
            _STATUS_200,
            _default_lines(defaults),
            lines,
            b"\r\n" if keep else b"connection: close\r\n\r\n",
        )
    )


def _default_lines(defaults: list[tuple[bytes, bytes]]) -> bytes:
    global _defaults
    if _defaults[0] is not defaults:
        lines = b"".join(b"%s: %s\r\n" % (name.lower(), value) for name, value in defaults)
        _defaults = (defaults, lines)
    return _defaults[1]


class _HeadWithBody:
    """The transport as one response cycle sees it.

    uvicorn writes the status line and headers as soon as the app starts its
    answer, and the body separately: two sends and, since the socket has
    TCP_NODELAY, two segments and two wake-ups of the client for every small
    response. This holds the head until the body's first chunk and sends both
    in one `writelines` (one send, no copy under uvloop). A head the body does
    not follow in the same loop turn (a stream that has nothing yet) leaves at
    the start of the next one.
    """

    __slots__ = ("_held", "_protocol", "_started", "_transport")

    def __init__(
        self, transport: asyncio.Transport, protocol: RelayHttpProtocol | None = None
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._held: bytes | None = None
        self._started = False

    def answer(self, cycle: Any, lines: bytes, body: bytes | Buffers) -> None:
        """Answer `cycle`'s GET (the cycle this transport is swapped into) with
        200, `lines` (from `header_lines`) and `body`, in one write: what
        uvicorn's `send` of the two messages does, without building and checking
        the same head for every reader. Only for a request whose answer has not
        begun, with no body, while the transport takes writes
        (`RelayHttpProtocol._answer_now` checks). The cycle is passed, not kept:
        a reference back to it from its own transport would make every cycle
        garbage that only the cycle collector frees."""
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.chunked_encoding = False
        cycle.expected_content_length = 0
        self._started = True
        keep = cycle.keep_alive
        self._held = _answer_head(cycle.default_headers, lines, keep)
        self.write(body)  # with the head, in one writelines (a big page as its slices)
        cycle.response_complete = True
        cycle.message_event.set()
        if not keep:
            self.close()
        cycle.on_response()

    def write(self, data: bytes | Buffers) -> None:
        if type(data) is Buffers:  # a body as its pieces (relay.wire): no join
            if self._held is not None:
                held, self._held = self._held, None
                self._transport.writelines((held, *data.parts))
            else:
                self._transport.writelines(data.parts)
            return
        assert isinstance(data, bytes)
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif not self._started:
            protocol = self._protocol
            if (
                protocol is not None
                and protocol.cycle.more_body
                and protocol.cycle.transport is self  # type: ignore[comparison-overlap]
            ):
                # Rare: written before the request's body has all arrived.
                if not protocol.cycle.response_started:  # receive()'s "100 Continue"
                    self._transport.write(data)
                    return
                data = protocol.answered_early(data)
            self._started = True
            self._held = data
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        if self._protocol is not None and self._protocol.linger_on_close:
            self._protocol.linger()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# At most this many heads are kept by `RelayHttpProtocol._remember` (then it starts
# over): a few cursors' worth of a herd's identical reads.
PARSED_MAX = 256


class RelayHttpProtocol(HttpToolsProtocol):
    head_limit = 16384
    head_timeout = 5.0
    # An early answer keeps the connection when its request's body (by
    # Content-Length) is at most this long: the rest is read and dropped.
    drain_limit = 65536
    # A lingering close discards at most this many late bytes, for at most
    # `linger_seconds` (and never longer than `head_timeout` between two reads).
    linger_limit = 16 * 1024 * 1024
    linger_seconds = 30.0

    # A read that is exactly one bodiless GET head, byte for byte the same as one
    # answered without a task before, skips the parser: see `_answer_parsed`.
    parsed_max_bytes = 2048

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        front = getattr(self.app, "front", None)
        # The heads answered without a task, by their bytes (shared by the app's
        # connections): Front.parsed.
        self._parsed: dict[bytes, Any] | None = None if front is None else front.parsed
        self._begins = 0  # messages begun in the read being parsed
        self._answered: Any = None  # the cycle `_answer_now` answered in that read
        self._in_head = False  # between on_message_begin and on_headers_complete
        self._in_message = False  # between on_message_begin and on_message_complete
        self._began = False  # a message began in the read being parsed
        self._head_bytes = 0
        # Once set, input is no longer parsed: it is dropped, at most this many bytes.
        self._discard_left: int | None = None
        self._final: bytes | None = None  # an error answer owed after the pending ones
        self._linger_end: float | None = None
        self.linger_on_close = False
        self._stopping = False  # the server is shutting down: no lingering
        # The stall deadline is a float that every request moves (three times for a
        # POST); one lazy timer per connection checks it, because a call_later and a
        # cancel per move would be a visible share of a publish's cost.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._deadline = deadline = self.loop.time() + self.head_timeout
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check)

    def _disarm(self) -> None:
        self._deadline = None  # a pending check finds nothing to do

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # moved since this check was scheduled
            self._timer = self.loop.call_at(deadline, self._check)
            return
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discard_left is not None:
            self._discard(len(data))
            return
        parsed = self._parsed
        idle = False
        if (
            parsed is not None
            and len(data) <= self.parsed_max_bytes
            and data.startswith(b"GET ")  # a publish's body is never hashed for this
            and self._idle()
        ):
            template = parsed.get(data)
            if template is not None and self._answer_parsed(template):
                return
            idle = True
        self._began = False
        self._begins = 0
        self._answered = None
        super().data_received(data)
        if idle:
            self._remember(data)
        if not self._in_head or self._discard_left is not None or self.parser is None:
            return
        # A head is in progress: count its bytes only, not those of the requests
        # before it in this read (pipelining) nor a body an early answer left.
        if self._began:
            self._head_bytes = self._head_in(data)
        else:
            self._head_bytes += len(data)
        if self._head_bytes > self.head_limit:
            refusal = headers_too_large(self.head_limit)
            self._refuse(
                _error_bytes(
                    refusal.status,
                    b"Request Header Fields Too Large",
                    refusal.code,
                    refusal.message,
                )
            )

    def _idle(self) -> bool:
        """Between requests: the last answered in full, nothing queued or owed,
        no message begun (so the parser is where a fresh one would start)."""
        cycle = self.cycle
        return (
            cycle is not None
            and cycle.response_complete
            and not self._in_message
            and not self.pipeline
            and self._final is None
            and self._linger_end is None
            and not self._stopping  # shutting down: uvicorn's own path closes
        )

    def _remember(self, data: bytes) -> None:
        """After the parser took `data` from the idle state: if it was exactly one
        request, answered at once by `_answer_now` and kept alive, keep the scope
        the parse gave, by those bytes. The parse of the same bytes from the same
        state is the same, so `_answer_parsed` may skip it; every check that is
        not the parse (the route, the header limit, the access check, the page
        cache) runs again for each request."""
        cycle = self._answered
        parsed = self._parsed
        if (
            cycle is None
            or parsed is None
            or self._begins != 1
            or self._in_message
            or self.cycle is not cycle
            or not cycle.keep_alive
            or self.pipeline
            or self._discard_left is not None
            or self.transport.is_closing()
            or self.expect_100_continue
        ):
            return
        if len(parsed) >= PARSED_MAX:  # bounded: many different heads just start over
            parsed.clear()
        kept = self.app.front.keep(cycle.scope)
        if kept is not None:
            parsed[data] = kept

    def _answer_parsed(self, kept: Any) -> bool:
        """Answer a read whose bytes `_remember` kept, without the parser, uvicorn's
        cycle or a task: what `_answer_now` does (`Front.answer_kept`), for this
        connection's peer. False (nothing done) when the app declines; then the
        bytes are parsed as usual."""
        if self.flow.write_paused or self.access_log:
            return False
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False  # uvicorn's 503 for its concurrency limit: the usual path
        front = self.app.front
        self._unset_keepalive_if_required()
        if not front.answer_kept(kept, self.client, self._write_answer):
            return False
        # on_response_complete's work for this case (nothing pipelined, owed or
        # lingering): the next request is due within head_timeout, which the lazy
        # stall timer (`_arm`) enforces; uvicorn's keep-alive timer, a timer made
        # and cancelled per request, is set only when it would close sooner.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return True
        self.flow.resume_reading()
        if self.timeout_keep_alive < self.head_timeout:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        self._arm()
        return True

    def _write_answer(self, lines: bytes, body: bytes | Buffers) -> None:
        """`_HeadWithBody.answer` for `_answer_parsed`: a 200 kept alive, in one
        writelines."""
        head = _answer_head(self.server_state.default_headers, lines, True)
        if type(body) is Buffers:
            self.transport.writelines((head, *body.parts))
        else:
            assert isinstance(body, bytes)
            self.transport.writelines((head, body))

    def _head_in(self, data: bytes) -> int:
        """How much of `data` is the head in progress, which began in `data`.

        It is the tail of `data` that starts with the request line: the method,
        one space, then the target the parser has passed on so far. (The parser
        gives no offsets; a header repeating the request line makes this an
        undercount, by less than one read.)
        """
        url = self.url
        if not url:  # no more than (part of) a method
            return 0
        start = data.rfind(self.parser.get_method() + b" " + url)
        return len(data) - start if start >= 0 else len(url)

    def send_400_response(self, msg: str) -> None:
        self._refuse(_error_bytes(400, b"Bad Request", "bad_request", msg))

    def _refuse(self, answer: bytes) -> None:
        """End the connection with `answer` in place of the request being parsed.

        Nothing more is parsed. A bad head is answered once the requests
        pipelined before it have had their answers; a bad body (chunk framing)
        is its request's answer, unless that answer has begun: then the
        connection just closes, as uvicorn would.
        """
        self._disarm()
        self._discard_left = self.linger_limit
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            self._answer_and_linger(answer)
        elif self._in_head or not self._in_message:
            self._final = answer
        elif self.pipeline and self.pipeline[0][0] is cycle:  # queued: drop it
            self.pipeline.popleft()
            self._final = answer
        elif not cycle.response_started:  # running: its app sees a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
            self._answer_and_linger(answer)
        else:
            self.transport.close()

    def _answer_and_linger(self, answer: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.linger()

    def answered_early(self, head: bytes) -> bytes:
        """The current request is answered (this is the answer's head) while its
        body is still arriving. Returns the head to send.

        A body of at most `drain_limit` bytes by Content-Length is left to the
        parser, which drops it (uvicorn ignores a body after the answer) and
        goes on to the next request. Anything else (longer, chunked, or a client
        that waits for `100 Continue` and may never send the body) cannot be
        told apart from the next request without reading it all: the answer
        says `connection: close` and the connection lingers, then closes.
        """
        cycle = self.cycle
        declared = None
        for name, value in self.headers:
            if name == b"content-length":
                declared = int(value)
            elif name == b"transfer-encoding":
                declared = None
                break
        if (
            declared is not None
            and cycle.keep_alive
            and not self.expect_100_continue
            and declared <= self.drain_limit
        ):
            return head
        self.linger_on_close = True
        if cycle.keep_alive:  # else uvicorn has already said connection: close
            cycle.keep_alive = False
            head = head[:-2] + b"connection: close\r\n\r\n"
        return head

    def linger(self) -> None:
        """Close after what is queued has been sent, without a reset: send FIN,
        drop what the client still sends (within the linger bounds) until it
        closes too, then close."""
        self.linger_on_close = False
        if self._discard_left is None:
            self._discard_left = self.linger_limit
        self._final = None
        self._unset_keepalive_if_required()
        transport = self.transport
        if transport.is_closing():
            return
        if self._stopping or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._linger_end = self.loop.time() + self.linger_seconds
        self.flow.resume_reading()
        self._arm_linger()

    def _arm_linger(self) -> None:
        """While lingering the client must keep sending (or close), and not for ever."""
        assert self._linger_end is not None
        self._arm()
        if self._deadline is not None and self._linger_end < self._deadline:
            self._deadline = self._linger_end

    def _discard(self, size: int) -> None:
        left = self._discard_left
        assert left is not None
        self._discard_left = left = left - size
        if left < 0:
            self.transport.close()
        elif self._linger_end is not None:
            self._arm_linger()

    def shutdown(self) -> None:
        self._stopping = True
        if self._linger_end is not None:  # the answers are out: close now
            self.transport.close()
            return
        super().shutdown()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._in_message = self._began = True
        self._head_bytes = 0
        self._begins += 1

    def on_headers_complete(self) -> None:
        self._in_head = False
        # A body, if any, must keep arriving: re-armed on every chunk.
        if self.parser.get_method() in (b"POST", b"PUT", b"PATCH"):
            self._arm()
        else:
            self._disarm()
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not previous:  # a new request (not an upgrade)
            self._wrap(cycle)  # if _start_asgi_task has not (a pipelined request)

    def _wrap(self, cycle: Any) -> _HeadWithBody:
        """The cycle's transport as `_HeadWithBody`, swapped in once."""
        transport = cycle.transport
        if not isinstance(transport, _HeadWithBody):
            cycle.transport = transport = _HeadWithBody(self.transport, self)
            # Its write takes a body as several buffers (relay.wire).
            cycle.scope.setdefault("extensions", {})[VECTORED] = {}
        return transport

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if not self._answer_now(cycle, app):
            super()._start_asgi_task(cycle, app)

    def _answer_now(self, cycle: Any, app: Any) -> bool:
        """Answer `cycle` from prebuilt bytes, if the app has them, instead of
        starting a task for it: a herd of readers asking for the same newest page
        after every append is the normal case (docs/benchmarks.md, the herd).

        Only a request with no body (nothing may follow its head but the next
        request), on a transport that takes writes, to the relay's own app (not
        uvicorn's 503 for its concurrency limit) with uvicorn's access log off.
        The app runs its own checks (`Front.answer_now`) and declines when any
        would answer otherwise; then the request goes to the app as usual.
        """
        front = getattr(app, "front", None)
        if front is None or cycle.access_log or self.flow.write_paused:
            return False
        transport = self._wrap(cycle)
        for name, _ in cycle.scope["headers"]:
            if name in (b"content-length", b"transfer-encoding"):
                return False
        answer_now: Callable[[Any, Callable[[bytes, bytes | Buffers], None]], bool] = (
            front.answer_now
        )
        if not answer_now(cycle.scope, functools.partial(transport.answer, cycle)):
            return False
        self._answered = cycle
        return True

    def on_body(self, body: bytes) -> None:
        if self._deadline is not None:
            self._arm()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self.cycle is not None and self.cycle.response_complete:
            self._arm()  # the rest of an early-answered body: now the next head is due
        else:
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._linger_end is not None:  # closing: start no pipelined request
            self.server_state.total_requests += 1
            return
        if self._final is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._answer_and_linger(self._final)
            return
        super().on_response_complete()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._discard_left is not None:  # answers owed before a refusal: no timer
            self._disarm()
        elif self._in_message or cycle.response_complete:
            self._arm()  # the client owes the rest of a request, or the next one
        else:
            self._disarm()  # a whole request is being answered
