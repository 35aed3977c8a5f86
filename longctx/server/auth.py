"""API-key check for ``/v1/*``: ``Authorization: Bearer KEY``, compared in constant time.

A pure ASGI middleware (no body is read before the key is checked). ``/health``, ``/metrics`` and the
OpenAPI document stay open, as in vLLM: they expose no completions.
"""

from __future__ import annotations

import hashlib
import hmac

from longctx.server.errors import APIError

PROTECTED_PREFIX = "/v1"


def key_matches(header: bytes | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header value carries ``api_key``. Both sides are hashed first, so the
    comparison takes the same time whatever the length or content of the guess."""
    if not header:
        return False
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    want = hashlib.sha256(api_key.encode()).digest()
    got = hashlib.sha256(given.strip()).digest()
    return hmac.compare_digest(want, got)


class APIKeyMiddleware:
    """Answer 401 (OpenAI's error JSON) to a ``/v1`` request without the right bearer key."""

    def __init__(self, app, api_key: str) -> None:  # noqa: ANN001
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if key_matches(header, self.api_key):
            return await self.app(scope, receive, send)
        message = ("missing API key: pass it as 'Authorization: Bearer KEY'" if header is None
                   else "invalid API key")
        err = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)
