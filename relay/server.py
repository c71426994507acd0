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
* An answer's head leaves with its body in one send, not two (`_HeadWithBody`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from relay.errors import SECURITY_HEADERS

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

    __slots__ = ("_held", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif not self._started:
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
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RelayHttpProtocol(HttpToolsProtocol):
    head_limit = 16384
    head_timeout = 5.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        # The stall deadline is a float that every request moves (three times for a
        # POST); one lazy timer per connection checks it. A call_later and a cancel
        # per move cost about 5 % of a publish (py-spy, docs/benchmarks.md).
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
        before = self._in_head
        super().data_received(data)
        if self.transport.is_closing() or self.parser is None:
            return
        if self._in_head:
            self._head_bytes += len(data) if before else 0
            if self._head_bytes > self.head_limit:
                self._disarm()
                self.transport.write(
                    _error_bytes(
                        431,
                        b"Request Header Fields Too Large",
                        "headers_too_large",
                        f"the request line and headers exceed {self.head_limit} bytes",
                    )
                )
                self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(_error_bytes(400, b"Bad Request", "bad_request", msg))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

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
            cycle.transport = _HeadWithBody(self.transport)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self._deadline is not None:
            self._arm()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._in_head = True
            self._head_bytes = 0
            self._arm()
