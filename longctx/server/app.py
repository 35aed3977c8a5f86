"""``build_app``: the FastAPI application of ``longctx serve``.

    >>> app = build_app(LLM("model.gguf"), default_kv="snapkv:1024", api_key="secret")
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)    # or longctx.server.serve.run_server

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers server-sent events), ``GET /health``, ``GET /metrics``, plus FastAPI's
``/openapi.json`` and ``/docs``. Middlewares, outermost first: metrics (every request counted by status),
body size limit (413), API key (401, ``/v1`` only).

A completion request is validated and tokenized in a worker thread (:mod:`longctx.server.inputs`), run as
one :class:`~longctx.server.generation.Run` of its choices and formatted by
:class:`~longctx.server.outputs.Formatter`. While it runs, the connection is watched: a client that goes
away, before or during its response, gets its engine requests aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from longctx import __version__
from longctx.engine.async_engine import AsyncLLMEngine
from longctx.engine.llm import LLM
from longctx.kv.spec import KVSpec
from longctx.server.aio import unless_gone, wait_disconnect
from longctx.server.auth import APIKeyMiddleware
from longctx.server.errors import APIError, install_handlers, unavailable
from longctx.server.generation import Run
from longctx.server.inputs import Settings, chat_plan, completion_plan, sampling_defaults
from longctx.server.limits import BodyLimitMiddleware
from longctx.server.metrics import Metrics, MetricsMiddleware
from longctx.server.outputs import Formatter, TokenTexts
from longctx.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from longctx.server.sse import DONE, EventStreamResponse, event

DEFAULT_MAX_BODY_BYTES = 32 << 20
CLIENT_GONE = 499  # nginx's "client closed request": the status recorded for a client that left first
_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "body too large"), (429, "waiting queue full (see Retry-After)"), (503, "shutting down"))}
_STREAM = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
           "description": "the response, or with stream: true server-sent events"}


@dataclass
class ServerState:
    """What the routes share (also ``app.state.longctx``, for tests and embedding applications)."""

    engine: AsyncLLMEngine
    llm: LLM
    model_name: str
    settings: Settings
    metrics: Metrics
    texts: TokenTexts
    created: int

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def default_model_name(llm: LLM) -> str:
    source = Path(str(llm.source))
    return source.stem if source.suffix == ".gguf" else source.name


def build_app(llm_or_engine: LLM | AsyncLLMEngine, *, served_model_name: str | None = None,
              default_kv: str = "full", api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              shutdown_timeout: float = 30.0, max_choices: int = 128) -> FastAPI:
    """The app over one model. An ``LLM`` gets its own :class:`AsyncLLMEngine` (one per LLM at a time: it
    steps the LLM's engine); the app's shutdown (lifespan) stops it, giving in-flight requests
    ``shutdown_timeout`` seconds. ``default_kv`` is the spec of requests without ``kv``; ``api_key``
    protects ``/v1``; ``max_body_bytes`` bounds request bodies; ``max_choices`` bounds prompts x n."""
    engine = llm_or_engine if isinstance(llm_or_engine, AsyncLLMEngine) else AsyncLLMEngine(llm_or_engine.engine)
    llm = engine.engine.llm
    llm.allow_head_scoring = False  # heads=auto must not calibrate inside a request (minutes): cached scores only
    KVSpec.parse(default_kv)  # a bad default fails here, not on the first request
    name = served_model_name or default_model_name(llm)
    state = ServerState(engine, llm, name, Settings(default_kv, max_choices, sampling_defaults(llm)),
                        Metrics(name), TokenTexts(llm.tokenizer), int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="longctx", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions with a KV-cache method per request (field `kv`).")
    app.state.longctx = state
    install_handlers(app)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_card(state)]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return _card(state)

    @app.post("/v1/completions", responses={200: _STREAM, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _complete(state, request, body, chat=False)

    @app.post("/v1/chat/completions", responses={200: _STREAM, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _complete(state, request, body, chat=True)

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> Response:
        if not engine.accepting:
            return unavailable("the server is shutting down").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        stats = await asyncio.to_thread(engine.engine.stats)  # takes the engine's lock: off the event loop
        return PlainTextResponse(state.metrics.render(stats, engine.errors),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def _card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "longctx",
            "max_model_len": state.llm.max_model_len, "default_kv": str(KVSpec.parse(state.settings.default_kv))}


async def _complete(state: ServerState, request: Request, body: CompletionRequest | ChatCompletionRequest,
                    chat: bool) -> Response:
    state.check_model(body.model)
    if not state.engine.accepting:
        raise unavailable("the server is shutting down")
    make_plan = chat_plan if chat else completion_plan
    plan = await asyncio.to_thread(make_plan, body, state.llm, state.settings)  # type: ignore[arg-type]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    run = Run(state.engine, plan, rid, state.metrics)
    fmt = Formatter(plan, rid, state.model_name, chat, state.texts)
    headers = {"x-request-id": rid}
    gone = asyncio.ensure_future(wait_disconnect(request.receive))
    streaming = False
    try:
        if not await unless_gone(run.start(), gone):
            return Response(status_code=CLIENT_GONE)
        if body.stream:
            streaming = True
            gone.cancel()  # from here the response watches the connection itself
            return EventStreamResponse(_events(run, fmt), on_close=run.close, headers=headers)
        finals: list[Any] = []
        if not await unless_gone(_into(run.final_outputs(), finals), gone):
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(fmt.response(finals), headers=headers)
    finally:
        gone.cancel()
        if not streaming:
            await run.close()


async def _into(coro: Awaitable[list[Any]], out: list[Any]) -> None:
    out.extend(await coro)


async def _events(run: Run, fmt: Formatter) -> AsyncIterator[bytes]:
    for chunk in fmt.first_chunks():
        yield event(chunk)
    try:
        async for i, out in run.outputs():
            chunk = fmt.chunk(i, out, run.last)
            if chunk is not None:
                yield event(chunk)
        if run.plan.include_usage:
            yield event(fmt.usage_chunk(run.last))
    except APIError as e:  # the response has started: the error travels as an event (the openai client raises)
        yield event(e.body())
    yield DONE
