"""Raw HTTP/1.1 over a socket to a real relay process: requests sent byte for byte
as given (hostile framing, odd targets) and the answers read back, plus the check
that an answer is a clean JSON 4xx.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.relayproc import RelayProcess

WAIT = 20.0  # upper bound on any wait for an answer


@dataclass
class Answer:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, buf: bytearray, deadline: float) -> Answer | None:
    """One HTTP/1.1 answer from `sock` (buffer `buf`), or None if the server closed first."""
    while b"\r\n\r\n" not in buf:
        if not recv_into(sock, buf, deadline):
            return None
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        before = len(buf)
        if not recv_into(sock, buf, deadline):
            break
        body += buf[before:]
    buf[:] = body[length:]
    return Answer(int(status), reason, headers, bytes(body[:length]))


def recv_into(sock: socket.socket, buf: bytearray, deadline: float) -> bool:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        chunk = sock.recv(65536)
    except (TimeoutError, ConnectionError):
        return False
    buf += chunk
    return bool(chunk)


def connect(relay: RelayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)


def exchange(
    relay: RelayProcess, data: bytes, *, answers: int = 1, shut_write: bool = False
) -> list[Answer]:
    """Send raw bytes on a fresh connection; read up to `answers` answers."""
    with connect(relay) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        buf = bytearray()
        out: list[Answer] = []
        deadline = time.monotonic() + WAIT
        while len(out) < answers:
            answer = read_answer(sock, buf, deadline)
            if answer is None:
                break
            out.append(answer)
        return out


def request(
    method: str, target: str | bytes, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """A raw HTTP/1.1 request: the target is sent exactly as given."""
    raw_target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + raw_target + b" HTTP/1.1", b"Host: relay.test"]
    all_headers = {"Connection": "close", **(headers or {})}
    if body and "Content-Length" not in all_headers and "Transfer-Encoding" not in all_headers:
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}".encode("latin-1") for k, v in all_headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_clean_4xx(answer: Answer | httpx.Response, *statuses: int) -> None:
    """A 4xx (one of `statuses` when given; 503 only when named there) with a JSON
    error body and no internals."""
    status = answer.status if isinstance(answer, Answer) else answer.status_code
    body = answer.body if isinstance(answer, Answer) else answer.content
    assert 400 <= status < 500 or (status == 503 and 503 in statuses), (status, body[:300])
    if statuses:
        assert status in statuses, (status, body[:300])
    assert b"Traceback" not in body and b'File "' not in body
    error = json.loads(body)
    assert set(error) == {"error", "message"}, error
    assert re.fullmatch(r"[a-z_]+", error["error"]), error


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def upgrade(target: str | bytes, headers: dict[str, str] | None = None) -> bytes:
    """A raw WebSocket hand-shake request (keeps `Connection: Upgrade`)."""
    data = request("GET", target, {**UPGRADE, **(headers or {})})
    return data.replace(b"Connection: close\r\n", b"", 1)
