"""Server-sent events: the ``data: {...}`` framing of OpenAI's streams, and a response that stops the moment
its client disconnects.

:class:`EventStreamResponse` sends the events of an async iterator while watching the connection: when the
client goes away it cancels the iterator (whose ``finally`` aborts the engine requests, freeing their KV
blocks) even while no event is due, e.g. while a long prompt is still being prefilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response

from longctx.server.aio import cancel_and_wait, wait_disconnect

log = logging.getLogger("longctx.server")

DONE = b"data: [DONE]\n\n"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]


def event(data: dict[str, Any]) -> bytes:
    """One SSE event carrying ``data`` as compact JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStreamResponse(Response):
    """An ASGI response streaming ``events`` (already framed bytes) with status 200.

    ``on_close`` is awaited when the response ends for any reason (done, client gone, server cancelling it),
    even if the iterator never started."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.events, self.on_close = events, on_close
        self.status_code = 200
        self.background = None
        self.raw_headers = HEADERS + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def _send_all(self, send) -> None:  # noqa: ANN001
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        sender = asyncio.ensure_future(self._send_all(send))
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            try:
                await cancel_and_wait(sender, watcher)
            except Exception:  # a bug in the stream: the response has started, so log it only
                log.exception("error while streaming a response")
            finally:
                with contextlib.suppress(RuntimeError):  # RuntimeError: the iterator still runs elsewhere
                    await self.events.aclose()  # type: ignore[attr-defined]
                if self.on_close is not None:
                    await self.on_close()
