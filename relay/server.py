"""uvicorn protocols with the limits uvicorn lacks (prototype from the hardening pass).

* A request head must arrive whole within `head_timeout` seconds of the connection
  opening (or of the previous response), and a started body may not stall longer
  than that between chunks: a slowloris is closed, not kept for ever.
* A request head may not grow past `head_limit` bytes while it arrives: 431 and
  close, before uvicorn's parser buffers (and re-copies) an endless header.
* Parser errors are answered with the relay's JSON error shape and security headers.
* A WebSocket hand-shake the websockets library refuses is answered (uvicorn's
  sans-I/O protocol leaves the library's 4xx unsent).
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


class RelayWebSocketProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()


class RelayHttpProtocol(HttpToolsProtocol):
    head_limit = 16384
    head_timeout = 5.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.head_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._timer is not None:
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
