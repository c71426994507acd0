"""The uvicorn and Starlette internals the relay builds on, and what they buy.

The relay subclasses uvicorn's httptools and sans-I/O WebSocket protocols (for the
guarantees listed in relay/server.py) and swaps each response cycle's transport
(one send per small answer). pyproject.toml bounds uvicorn to the minor versions
these were checked against; these tests fail loudly, naming the missing piece,
when a uvicorn release renames or reshapes any of it, and check on a real relay
that the one-send saving is in effect. `JSONBytes` (the publish and read answers)
sets Response's attributes without Response.__init__: checked against Starlette's
own constructor.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import struct
import sys
from dataclasses import replace
from typing import Any

import pytest
import uvicorn
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from relay.api.envelopes import JSONBytes
from relay.server import RelayHttpProtocol, RelayWebSocketProtocol, _HeadWithBody, header_lines
from tests.relayproc import RelayProcess

# Every uvicorn method the relay's protocols override (and must keep the signature of).
HTTP_OVERRIDES = {
    "connection_made",
    "connection_lost",
    "data_received",
    "send_400_response",
    "shutdown",
    "on_message_begin",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
    "_start_asgi_task",  # a cached read is answered there, with no task
}
WS_OVERRIDES = {
    "connection_made",
    "connection_lost",
    "pause_writing",
    "resume_writing",
    "data_received",
    "shutdown",
}
# uvicorn methods the relay's protocols call without overriding them.
HTTP_CALLS = {"_unset_keepalive_if_required", "timeout_keep_alive_handler"}
# uvicorn state the HTTP protocol reads or sets, on itself and on a request's cycle.
HTTP_STATE = (
    "app",
    "app_state",
    "client",
    "server",
    "access_log",
    "timeout_keep_alive",
    "timeout_keep_alive_task",
    "limit_concurrency",
    "connections",
    "tasks",
    "loop",
    "transport",
    "parser",
    "url",
    "headers",
    "cycle",
    "pipeline",
    "expect_100_continue",
    "flow",
    "server_state",
)
CYCLE_STATE = (
    "scope",
    "access_log",
    "default_headers",
    "on_response",
    "waiting_for_100_continue",
    "chunked_encoding",
    "expected_content_length",
    "transport",
    "more_body",
    "response_started",
    "response_complete",
    "keep_alive",
    "disconnected",
    "message_event",
)


def overridden(ours: type, base: type) -> set[str]:
    """Names our class defines that the base (or its bases) defines too."""
    return {name for name in vars(ours) if not name.startswith("__") and hasattr(base, name)}


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    ("ours", "base", "expected"),
    [
        (RelayHttpProtocol, HttpToolsProtocol, HTTP_OVERRIDES),
        (RelayWebSocketProtocol, WebSocketsSansIOProtocol, WS_OVERRIDES),
    ],
)
def test_each_override_replaces_a_uvicorn_method_of_the_same_signature(
    ours: type, base: type, expected: set[str]
) -> None:
    # A method uvicorn renamed would leave ours never called: it is missing here.
    assert overridden(ours, base) == expected, f"uvicorn {uvicorn.__version__}"
    for name in sorted(expected):
        assert parameters(getattr(ours, name)) == parameters(getattr(base, name)), name


def test_the_uvicorn_methods_the_http_protocol_calls_exist() -> None:
    for name in sorted(HTTP_CALLS):
        assert callable(getattr(HttpToolsProtocol, name, None)), name
        assert parameters(getattr(HttpToolsProtocol, name)) == ["self"], name
    # The cycle writes a response through `transport.write`: what `_HeadWithBody` holds.
    assert "self.transport.write(" in inspect.getsource(RequestResponseCycle.send)
    # The WebSocket protocol reads these of its websockets connection.
    ws = inspect.getsource(WebSocketsSansIOProtocol)
    for needle in ("self.handshake_initiated", "self.conn = ", "self.transport = transport"):
        assert needle in ws, needle


def test_handle_exit_is_uvicorns_signal_hook_with_the_same_signature() -> None:
    assert parameters(uvicorn.Server.handle_exit) == ["self", "sig", "frame"]
    assert callable(getattr(uvicorn.Server, "capture_signals", None))


def test_the_uvicorn_state_the_http_protocol_reads_is_there_on_a_real_connection() -> None:
    seen: dict[str, Any] = {}
    protocols: list[RelayHttpProtocol] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        protocol = protocols[-1]
        cycle = protocol.cycle
        seen["missing"] = [n for n in HTTP_STATE if not hasattr(protocol, n)] + [
            f"cycle.{n}" for n in CYCLE_STATE if not hasattr(cycle, n)
        ]
        seen["method"] = protocol.parser.get_method()
        seen["more_body"] = cycle.more_body  # the body is still arriving
        seen["swapped"] = isinstance(cycle.transport, _HeadWithBody)
        seen["total_requests"] = protocol.server_state.total_requests
        seen["resume_reading"] = callable(protocol.flow.resume_reading)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
        config.load()
        state = ServerState()

        def factory() -> RelayHttpProtocol:
            protocols.append(RelayHttpProtocol(config, state, {}, _loop=loop))
            return protocols[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Half the body: the answer comes early, through `answered_early`.
            writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
            return await asyncio.wait_for(reader.readuntil(b"ok"), 30)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    answer = asyncio.run(main())
    assert seen["missing"] == [], f"uvicorn {uvicorn.__version__}"
    assert seen["method"] == b"POST"
    assert seen["more_body"] is True
    assert seen["swapped"] is True
    assert isinstance(seen["total_requests"], int)
    assert seen["resume_reading"] is True
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nok")


class StarletteJSONBytes(Response):
    media_type = "application/json"


@pytest.mark.parametrize("headers", [None, {"X-Relay-More": "true", "X-Relay-Next": "after=5"}])
def test_json_bytes_sets_what_starlettes_response_constructor_sets(
    headers: dict[str, str] | None,
) -> None:
    ours = JSONBytes(b'{"seq":1}', headers)
    theirs = StarletteJSONBytes(b'{"seq":1}', headers=headers)
    # A new attribute in Starlette's constructor (that __call__ may read) fails here.
    assert set(vars(ours)) == set(vars(theirs))
    assert (ours.status_code, ours.body, ours.background, ours.media_type) == (
        theirs.status_code,
        theirs.body,
        theirs.background,
        theirs.media_type,
    )
    # The same headers (JSONBytes keeps a header name's case as the caller wrote it).
    assert sorted((k.lower(), v) for k, v in ours.raw_headers) == sorted(theirs.raw_headers)


# ------------------------------------------------------------ one send per answer
def data_segments_in(sock: socket.socket) -> int:
    """Linux's tcp_info.tcpi_data_segs_in: segments received that carried data."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 152)[0])


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request; read until its whole answer (head and Content-Length body) is in."""
    sock.sendall(request)
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            lengths = [
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            assert len(lengths) == 1, head
            if len(body) >= lengths[0]:
                assert len(body) == lengths[0], data
                return data


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tcp_info is Linux's")
def test_a_small_answer_leaves_in_one_segment_head_and_body_together() -> None:
    # The kernel counts the segments; no timing is involved. Without the held head
    # every one of these answers takes two (the head, then the body).
    ws = "/v1/workspaces/one-send"
    requests = [
        b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST %s/envelopes HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}" % ws.encode(),
        b"GET %s/envelopes?after=0&limit=5 HTTP/1.1\r\nhost: x\r\n\r\n" % ws.encode(),
        b"GET %s/nowhere HTTP/1.1\r\nhost: x\r\n\r\n" % ws.encode(),  # an error answer
    ]
    with RelayProcess() as proc, socket.create_connection(("127.0.0.1", proc.port)) as sock:
        segments = []
        for _ in range(20):
            for request in requests:
                before = data_segments_in(sock)
                answer = exchange(sock, request)
                assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 404 ")), answer
                segments.append(data_segments_in(sock) - before)
    assert segments == [1] * len(segments)


def test_header_lines_are_checked_lowered_and_leave_the_framing_to_uvicorn() -> None:
    lines = header_lines([(b"Content-Length", b"2"), (b"x-relay-head", b"5")])
    assert lines == b"content-length: 2\r\nx-relay-head: 5\r\n"
    for bad in (
        [(b"content-length", b"2"), (b"connection", b"close")],
        [(b"content-length", b"2"), (b"transfer-encoding", b"chunked")],
        [(b"content-length", b"2"), (b"x-a", b"one\r\ntwo")],
        [(b"content-length", b"2"), (b"bad name", b"v")],
        [(b"content-type", b"application/json")],  # no length
    ):
        with pytest.raises(ValueError):
            header_lines(bad)


def _without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.startswith(b"date:"))


def test_a_cached_read_answered_without_the_app_is_the_apps_answer_byte_for_byte() -> None:
    # The first read builds the page as its head is parsed and the next ones are
    # answered from the cache, all by the protocol with no task (relay/server.py
    # _answer_now): the same bytes as the app's answer (a GET with a body goes to
    # the app), in order when pipelined, with Connection: close honoured; a HEAD
    # and a read without the token go to the app too.
    ws = b"/v1/workspaces/cached-now"
    auth = b"authorization: Bearer t\r\n"
    read = b"GET %s/envelopes?after=0 HTTP/1.1\r\nhost: x\r\n%s\r\n" % (ws, auth)
    env = {"HIVE_RELAY_ACCESS_TOKENS": "t"}
    with RelayProcess(env=env) as proc, socket.create_connection(("127.0.0.1", proc.port)) as sock:
        post = b'POST %s/envelopes HTTP/1.1\r\nhost: x\r\n%scontent-length: 7\r\n\r\n{"a":1}'
        assert exchange(sock, post % (ws, auth)).startswith(b"HTTP/1.1 200 ")
        first = exchange(sock, read)  # built by the app, then cached
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b'"body":{"a":1}}]'), first
        assert _without_date(exchange(sock, read)) == _without_date(first)
        sock.sendall(read * 3)  # pipelined: three answers, whole and in order
        data = b""
        while data.count(b"HTTP/1.1 200 ") < 3 or not data.endswith(b"}]"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        answers = [b"HTTP/1.1 200 " + part for part in data.split(b"HTTP/1.1 200 ")[1:]]
        assert [_without_date(a) for a in answers] == [_without_date(first)] * 3
        with_body = read.replace(b"\r\n\r\n", b"\r\ncontent-length: 2\r\n\r\n{}")
        assert _without_date(exchange(sock, with_body)) == _without_date(first)
        sock.sendall(read.replace(b"GET ", b"HEAD ", 1))
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n"), head
        refused = exchange(sock, read.replace(auth, b""))
        assert refused.startswith(b"HTTP/1.1 401 "), refused
        # Misses that read_now declines: the endpoint answers them.
        miss = read.replace(b"after=0", b"after=0&limit=3")
        assert exchange(sock, miss.replace(auth, b"")).startswith(b"HTTP/1.1 401 ")
        bad = exchange(sock, read.replace(b"after=0", b"after=x"))
        assert bad.startswith(b"HTTP/1.1 400 "), bad
        polled = exchange(sock, read.replace(b"after=0", b"after=0&wait=1"))
        assert _without_date(polled) == _without_date(first)
        closing = read.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
        last = exchange(sock, closing)
        assert b"\r\nconnection: close" in last.partition(b"\r\n\r\n")[0], last
        assert _without_date(last.replace(b"connection: close\r\n", b"")) == _without_date(first)
        assert sock.recv(100) == b""  # closed after the answer


# ------------------------------------------------------------ the same bytes again
class _Transport(asyncio.Transport):
    """What the protocol writes, kept; a peer of our choosing."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.out = b""
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += bytes(data)

    def writelines(self, data: Any) -> None:
        for part in data:
            self.write(part)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.peer, 4000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _CountingParser:
    """The connection's httptools parser, counting the reads it is fed."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += 1
        self.parser.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


def test_a_read_sent_again_byte_for_byte_skips_the_parser_and_nothing_else() -> None:
    """Followers at one cursor send the same bytes (the herd, docs/benchmarks.md):
    the protocol keeps what the parser made of a read answered at once and answers
    the same bytes again, on any connection, without the parser; the page, the
    access check and the log line are each looked at afresh. Bytes that are not a
    whole request from the idle state (half a head before them, or a second
    request after them) go to the parser."""
    from relay import logs
    from relay.app import create_app
    from relay.settings import Settings

    async def main() -> None:
        import io

        out = io.StringIO()
        logs.configure("text", "info", out)
        app = create_app(Settings(access_tokens="t"))
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, proxy_headers=False
        )
        config.load()
        state = ServerState()
        relay = app.state.relay
        await relay.store.append("again", b'{"a":1}', b"k1")

        async def connect(peer: str) -> tuple[RelayHttpProtocol, _Transport, _CountingParser]:
            protocol = RelayHttpProtocol(config, state, {})
            transport = _Transport(peer)
            protocol.connection_made(transport)
            counting = _CountingParser(protocol.parser)
            protocol.parser = counting  # type: ignore[assignment]
            # Not the first request: the first one of a connection is always parsed.
            protocol.data_received(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.sleep(0.05)
            transport.out = b""
            return protocol, transport, counting

        read = (
            b"GET /v1/workspaces/again/envelopes?after=0 HTTP/1.1\r\n"
            b"host: x\r\nauthorization: Bearer t\r\n\r\n"
        )
        one, one_out, one_parser = await connect("10.0.0.1")
        two, two_out, two_parser = await connect("10.0.0.2")
        one.data_received(read)
        assert one_out.out.startswith(b"HTTP/1.1 200 ") and one_out.out.endswith(b'{"a":1}}]')
        fed = one_parser.fed, two_parser.fed
        two.data_received(read)  # the same bytes, another connection: no parse
        assert _without_date(two_out.out) == _without_date(one_out.out)
        assert (one_parser.fed, two_parser.fed) == fed

        await relay.store.append("again", b'{"a":2}', b"k2")  # the page changed
        two_out.out = b""
        two.data_received(read)
        assert two_out.out.endswith(b'{"a":2}}]'), two_out.out
        assert two_parser.fed == fed[1]

        relay.set_access(replace(relay.access, static_tokens=("u",)))  # t revoked
        two_out.out = b""
        two.data_received(read)  # declined at once, so parsed and refused by the app
        await asyncio.sleep(0.05)
        assert two_out.out.startswith(b"HTTP/1.1 401 "), two_out.out
        assert two_parser.fed == fed[1] + 1
        relay.set_access(replace(relay.access, static_tokens=("t",)))

        # Half a head is in progress: the same bytes are the rest of it, parsed.
        one_out.out = b""
        one.data_received(b"GET /v1/health HTTP/1.1\r\nx-a: ")
        one.data_received(read)
        await asyncio.sleep(0.05)
        assert one_parser.fed == fed[0] + 2
        assert one_out.out.count(b"HTTP/1.1 ") == 1, one_out.out  # one request, one answer
        # Two requests in one read: parsed, both answered in order.
        one_out.out = b""
        one.data_received(read + read)
        await asyncio.sleep(0.05)
        assert one_parser.fed == fed[0] + 3
        assert one_out.out.count(b'{"a":2}}]') == 2, one_out.out
        logs._writer.flush()  # type: ignore[union-attr]
        lines = [line for line in out.getvalue().splitlines() if "/envelopes status=200" in line]
        assert [line.rsplit(" ", 1)[1] for line in lines] == [
            "client=10.0.0.1",
            "client=10.0.0.2",
            "client=10.0.0.2",
            "client=10.0.0.1",
            "client=10.0.0.1",
        ]
        for protocol in (one, two):
            protocol.connection_lost(None)

    asyncio.run(main())


@pytest.mark.slow
def test_a_connection_left_idle_after_a_read_answered_without_the_parser_is_closed() -> None:
    """The read answered from its kept parse leaves the connection on the relay's own
    stall timer, not uvicorn's keep-alive timer: idle past the timeout (1 s here),
    it is closed all the same."""
    read = b"GET /v1/workspaces/idle-after/envelopes?after=0 HTTP/1.1\r\nhost: x\r\n\r\n"
    post = (
        b"POST /v1/workspaces/idle-after/envelopes HTTP/1.1\r\n"
        b"host: x\r\ncontent-length: 2\r\n\r\n{}"
    )
    with (
        RelayProcess(env={"HIVE_RELAY_KEEPALIVE_TIMEOUT": "1"}) as proc,
        socket.create_connection(("127.0.0.1", proc.port)) as sock,
    ):
        assert exchange(sock, post).startswith(b"HTTP/1.1 200 ")
        first = exchange(sock, read)
        for _ in range(3):  # the same bytes again: answered from the kept parse
            assert _without_date(exchange(sock, read)) == _without_date(first)
        sock.settimeout(20)  # a generous bound; the relay closes after about 1 s
        assert sock.recv(100) == b""


def test_a_kept_reads_log_address_is_its_own_connections_behind_a_proxy_too() -> None:
    """A kept read (the same bytes as an earlier read) is logged with the address
    of the connection that sent it: its peer, or, from a trusted proxy, the
    forwarded address its bytes carry, as for any request."""
    from relay.app import build_relay
    from relay.settings import Settings

    scope = {"client": ("10.0.0.1", 1), "headers": [(b"x-forwarded-for", b"203.0.113.9")]}
    relay = build_relay(Settings())
    assert relay.peer_address(scope, ("10.0.0.2", 2)) == "10.0.0.2"
    assert relay.peer_address(scope, None) == "unknown"
    proxied = build_relay(Settings(trusted_proxies="10.0.0.0/8"))
    assert proxied.peer_address(scope, ("10.0.0.2", 2)) == "203.0.113.9"
    assert proxied.peer_address(scope, ("192.0.2.7", 2)) == "192.0.2.7"  # not a proxy
    assert proxied.peer_address(scope, ("192.0.2.7", 2)) == proxied.address(
        {**scope, "client": ("192.0.2.7", 2)}
    )


def test_a_kept_read_holds_no_connections_peer_and_few_headers() -> None:
    """What Front.keep keeps for a read's bytes: its scope without the peer or the
    state of the connection it came from (each read logs its own), and only for a
    head of at most KEPT_MAX_HEADERS headers (each kept scope stays small)."""
    from relay.app import KEPT_MAX_HEADERS, create_app
    from relay.settings import Settings

    front = create_app(Settings()).front  # type: ignore[attr-defined]
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/workspaces/kept/envelopes",
        "raw_path": b"/v1/workspaces/kept/envelopes",
        "query_string": b"after=0",
        "client": ("10.0.0.1", 1),
        "state": {"x": 1},
        "headers": [(b"x-h%d" % i, b"v") for i in range(KEPT_MAX_HEADERS)],
    }
    kept = front.keep(scope)
    assert kept is not None and kept.ws == "kept"
    assert kept.scope["client"] is None and kept.scope["state"] == {}
    assert scope["client"] == ("10.0.0.1", 1)  # the connection's own scope is untouched
    many = {**scope, "headers": [*scope["headers"], (b"x-one-more", b"v")]}
    assert front.keep(many) is None
