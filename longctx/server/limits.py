"""Request body size limit: a body over ``max_bytes`` is answered 413 before the application sees it.

A pure ASGI middleware. A declared ``Content-Length`` over the limit is refused at once; otherwise the body
is read (counting the bytes of a chunked upload as they come) and handed on in one piece. A refused body is
still drained, up to a bound, so the client reads the 413 instead of a reset connection.
"""

from __future__ import annotations

from longctx.server.errors import APIError

DRAIN_FACTOR = 4  # a refused body is read and dropped up to this many times the limit


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:  # noqa: ANN001
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds the server's limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                err = APIError(400, "invalid Content-Length header", code="invalid_header")
                return await err.response()(scope, receive, send)
            if length > self.max_bytes:
                if length <= DRAIN_FACTOR * self.max_bytes:
                    await _drain(receive, length)
                return await self._too_large().response()(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_FACTOR * self.max_bytes - size)
                return await self._too_large().response()(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():  # noqa: ANN202
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect when the client goes away

        await self.app(scope, replay, send)


async def _drain(receive, budget: int) -> None:  # noqa: ANN001
    """Read and drop up to ``budget`` bytes of the body still coming."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return
