"""Logging set-up: one line per request, as text or JSON. Never bodies or tokens;
the route template is logged, not the path, so workspace ids stay out of logs."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

ACCESS = logging.getLogger("relay.access")
LOG = logging.getLogger("relay")

# Set in the task serving one request when the relay ends an SSE answer without its
# last chunk because the peer stopped reading (relay/api/live.py). uvicorn then
# reports that answer as incomplete, at ERROR; for such a task that line is dropped:
# the peer is gone, the relay is not at fault, and it has logged at debug already.
STREAM_ABANDONED: ContextVar[bool] = ContextVar("hive_relay_stream_abandoned", default=False)
_INCOMPLETE = "ASGI callable returned without completing response."


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class _DropPathLines(logging.Filter):
    """uvicorn logs WebSocket hand-shakes with the full path (a workspace id);
    our request log already has one line per session, with the route template."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (
            msg.startswith('%s - "WebSocket')
            or msg in ("connection open", "connection closed")
            # The websockets library's debug lines: hand-shake headers (tokens) and frames.
            or (record.levelno <= logging.DEBUG and msg.startswith(("< ", "> ", "= ", "! ")))
            # Runs in the logging caller's context: the task of that one answer.
            or (msg == _INCOMPLETE and STREAM_ABANDONED.get())
        )


def configure(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_DropPathLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log prints paths (workspace ids); ours prints route templates.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def access(method: str, route: str, status: int, duration: float, client: str) -> None:
    ACCESS.info(
        "request",
        extra={
            "fields": {
                "method": method,
                "route": route,
                "status": status,
                "ms": round(duration * 1000, 2),
                "client": client,
            }
        },
    )
