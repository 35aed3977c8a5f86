"""``longctx serve``: an OpenAI-compatible HTTP server with a KV-cache method per request.

Needs the ``server`` extra (``pip install 'longctx[server]'``: FastAPI and uvicorn); ``import longctx``
and every other command work without it. Modules, one job each:

- :mod:`~longctx.server.app`: ``build_app`` (routes, middlewares, lifespan)
- :mod:`~longctx.server.protocol`: request / response bodies (pydantic, OpenAI's shapes)
- :mod:`~longctx.server.inputs`: a request -> prompt token ids, ``SamplingParams``, KV spec (all 400s)
- :mod:`~longctx.server.generation`: the engine requests of one HTTP request, started and aborted together
- :mod:`~longctx.server.outputs`: responses, stream chunks, usage, log-probabilities
- :mod:`~longctx.server.sse`: server-sent events, a stream that stops when its client leaves
- :mod:`~longctx.server.aio`: watching the connection, cancelling a request's work cleanly
- :mod:`~longctx.server.errors`: OpenAI's error JSON and the status of each error
- :mod:`~longctx.server.auth`, :mod:`~longctx.server.limits`: API key (401), body size limit (413)
- :mod:`~longctx.server.metrics`: Prometheus text for ``/metrics``
- :mod:`~longctx.server.serve`: uvicorn with graceful shutdown on SIGINT / SIGTERM
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'longctx[server]'"


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from longctx.server.app import build_app  # noqa: PLC0415

        return build_app
    if name == "run_server":
        from longctx.server.serve import run_server  # noqa: PLC0415

        return run_server
    raise AttributeError(f"module 'longctx.server' has no attribute {name!r}")
