"""A live ``longctx serve`` app on loopback for the server tests: uvicorn on a free port in a background
thread, over a tiny random checkpoint (or the real SmolLM2), plus small HTTP helpers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import uvicorn  # noqa: E402

from longctx.engine.llm import LLM  # noqa: E402
from longctx.server.app import build_app  # noqa: E402

API_KEY = "test-key-123"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Any
    llm: LLM
    api_key: str | None

    @property
    def state(self) -> Any:
        return self.app.state.longctx

    def client(self, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", self.api_key or "none"),
                             **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample line without its value: value}."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until the engine holds no request and no HTTP request is in flight."""
        deadline = time.monotonic() + timeout
        eng = self.llm.engine
        while time.monotonic() < deadline:
            if not eng.has_unfinished_requests() and not eng.requests and self.state.metrics.in_flight == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"server not idle after {timeout} s: {eng.stats()}, "
                             f"in flight {self.state.metrics.in_flight}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(llm: LLM, **app_kwargs: Any) -> Iterator[LiveServer]:
    """Serve ``build_app(llm, **app_kwargs)`` on 127.0.0.1 in a background thread until the block ends."""
    app = build_app(llm, **app_kwargs)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app, llm, app_kwargs.get("api_key"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    return LLM(tiny_checkpoint("llama")[0], max_num_seqs=16)
