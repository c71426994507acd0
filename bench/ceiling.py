"""The ceiling: bare Starlette on uvicorn (uvloop + httptools), same machine, same run.

POST /append          appends the body to a list (the publish ceiling)
GET  /read?size=N     returns a prebuilt bytes object of N bytes (the read ceiling)
GET  /sse             SSE; POST /fanout writes one prebuilt frame to every subscriber
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

STORED: list[bytes] = []
PREBUILT: dict[int, bytes] = {}
SUBSCRIBERS: set[asyncio.Queue[bytes]] = set()


async def append(request: Request) -> Response:
    STORED.append(await request.body())
    if len(STORED) > 50_000:
        STORED.clear()
    return Response(b'{"seq":1}', media_type="application/json")


async def read(request: Request) -> Response:
    size = int(request.query_params.get("size", "1024"))
    body = PREBUILT.get(size)
    if body is None:
        body = PREBUILT[size] = b"x" * size
    return Response(body, media_type="application/json")


async def sse(request: Request) -> Response:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    SUBSCRIBERS.add(queue)

    async def frames():  # type: ignore[no-untyped-def]
        try:
            yield b": connected\n\n"
            while True:
                yield await queue.get()
        finally:
            SUBSCRIBERS.discard(queue)

    return StreamingResponse(frames(), media_type="text/event-stream")


async def fanout(request: Request) -> Response:
    frame = b"data: " + await request.body() + b"\n\n"
    for q in SUBSCRIBERS:
        q.put_nowait(frame)
    return Response(b'{"ok":true}', media_type="application/json")


app = Starlette(
    routes=[
        Route("/append", append, methods=["POST"]),
        Route("/read", read),
        Route("/sse", sse),
        Route("/fanout", fanout, methods=["POST"]),
        Route("/v1/health", lambda r: Response(b"ok")),
    ]
)

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=a.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=2048,
    )
