"""asyncio helpers of the server: watching a connection, racing work against it, cancelling cleanly.

A request's work is cancelled when its client disconnects; these helpers make sure cancelled work has
finished (and run its ``finally``: the engine requests aborted) before the handler goes on, without
swallowing a cancellation of the handler itself (uvicorn cancels handlers that outlive a shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


async def wait_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Return once the ASGI connection reports ``http.disconnect`` (call after the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until they are done, ignoring their cancellation and OS errors (a send to a
    closed connection) but not a cancellation of the caller."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError


async def unless_gone(work: Awaitable[Any], gone: asyncio.Future[None]) -> bool:
    """Await ``work`` unless ``gone`` (the client disconnected) completes first: then cancel it and return
    False. ``work``'s own exception is raised."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            await cancel_and_wait(task)
    if task.cancelled():
        return False
    task.result()
    return True
