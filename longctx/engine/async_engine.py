"""``AsyncLLMEngine``: the engine stepping on its own thread, with an asyncio streaming front.

    >>> engine = AsyncLLMEngine(LLM("model.gguf").engine)
    >>> async for out in engine.generate("Hello", SamplingParams(max_tokens=8), kv="snapkv:1024"):
    ...     print(out.outputs[0].text_delta, end="")

One background thread runs :meth:`LLMEngine.step` while any request is
unfinished and sleeps otherwise; each step's outputs are handed to the event
loop of the coroutine that asked for them. A consumer that stops iterating (a
client that disconnected, a cancelled task) aborts its request, so its blocks
are freed at once. :meth:`shutdown` stops taking requests, lets running ones
finish within a timeout, aborts the rest and stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from longctx.engine.llm_engine import LLMEngine
from longctx.engine.request import RequestOutput
from longctx.engine.sampling import SamplingParams
from longctx.errors import LongctxError
from longctx.kv.spec import KVSpec

log = logging.getLogger("longctx.engine")


class EngineStoppedError(LongctxError):
    """The engine is shutting down and takes no new requests."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._sinks_lock = threading.Lock()
        self._wake = threading.Event()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._accept_lock = threading.Lock()
        self._stop = threading.Event()
        self.accepting = True
        self.errors = 0  # steps that raised (their requests ended with finish_reason "error")
        # The engine thread gives up the GIL while the device works and must get it back as soon as the step's
        # results are in; the default 5 ms switch interval would let the event loop keep it that long.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread = threading.Thread(target=self._loop, name="longctx-engine", daemon=True)
        engine.background = self._wake
        self._thread.start()

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            while True:  # aborts from streams that stopped listening: applied between steps, off the event loop
                try:
                    rid = self._aborts.get_nowait()
                except queue.Empty:
                    break
                self.engine.abort(rid)
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception:  # the failed requests are reported by the next step; keep serving the others
                log.exception("engine step failed")
                self.errors += 1
                continue
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]] = {}
            with self._sinks_lock:
                for out in outs:
                    sink = self._sinks.get(out.request_id)
                    if sink is not None:
                        by_loop.setdefault(sink[0], []).append((sink[1], out))
            for loop, items in by_loop.items():  # one wake-up of each event loop per step
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that event loop is closed: nobody is listening any more
                    for _, out in items:
                        self.engine.abort(out.request_id)

    # ---- requests ----------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams | None = None,
                       kv: str | KVSpec = "full", request_id: str | None = None, *,
                       chat: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream one completion: a :class:`RequestOutput` per step that produced tokens (``outputs[0]``
        carries ``new_token_ids`` and ``text_delta``), the last one with ``finished`` set. Errors in the
        request (a bad prompt or spec, a full queue) raise before the first output."""
        if not self.accepting:
            raise EngineStoppedError("the engine is shutting down")
        rid = request_id or f"req-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._sinks_lock:
            if rid in self._sinks:
                raise LongctxError(f"request id {rid!r} is already in use")
            self._sinks[rid] = (loop, outputs)
        finished = added = False
        try:
            # off the event loop: adding takes the engine's lock, which a running step holds
            adding = asyncio.ensure_future(asyncio.to_thread(self._add, prompt, params, kv, rid, chat))
            try:
                await asyncio.shield(adding)
            except asyncio.CancelledError:  # it may still be added: abort it once it is
                adding.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or self._abort_soon(rid))
                raise
            added = True
            self._wake.set()
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            with self._sinks_lock:
                self._sinks.pop(rid, None)
            if added and not finished:  # a refused request was never ours: its id may be another's
                self._abort_soon(rid)

    def _add(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams | None, kv: str | KVSpec,
             rid: str, chat: bool) -> None:
        with self._accept_lock:  # never after shutdown began: nobody would step it
            if not self.accepting:
                raise EngineStoppedError("the engine is shutting down")
            self.engine.add_request(prompt, params, kv, request_id=rid, chat=chat, stream=True)

    def _abort_soon(self, request_id: str) -> None:
        """Abort from the engine thread between steps (never blocks the caller's event loop)."""
        self._aborts.put(request_id)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    @property
    def num_unfinished(self) -> int:
        with self._sinks_lock:
            return len(self._sinks)

    # ---- shutting down -----------------------------------------------------------------------------
    def shutdown(self, timeout: float = 30.0) -> None:
        """Take no new requests; give running ones ``timeout`` seconds to finish, abort the rest, stop."""
        with self._accept_lock:
            self.accepting = False
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        self._wake.set()
        drain = time.monotonic() + 5.0
        while self.engine.has_unfinished_requests() and time.monotonic() < drain:
            time.sleep(0.01)  # the thread reports the aborts to their streams
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        if self.engine.background is self._wake:
            self.engine.background = None  # LLM.generate steps the engine itself again


def _deliver(items: list[tuple[asyncio.Queue[RequestOutput], RequestOutput]]) -> None:
    for outputs, out in items:
        outputs.put_nowait(out)
