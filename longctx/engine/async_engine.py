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

Host time per streamed token is kept small on both threads. The engine does not
build a full :class:`RequestOutput` per stream per step: streams are added as
non-streamed requests (the engine reports them when they finish), and after
each step the engine thread only slices the new token ids of every stream and
hands them, for all streams of one event loop, in one ``call_soon_threadsafe``. The consumer's side turns them into a
``RequestOutput`` (text by its own incremental detokenizer, the stop-string
hold-back of ``LLMEngine.output``) when it asks for the next one, so a consumer
that fell behind gets the tokens of several steps merged into one output
(concatenated ``new_token_ids`` / ``text_delta``) instead of one per step.
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

from longctx.engine.detokenizer import IncrementalDetokenizer
from longctx.engine.llm_engine import LLMEngine
from longctx.engine.request import CompletionOutput, Request, RequestOutput, RequestStats
from longctx.engine.sampling import SamplingParams
from longctx.errors import LongctxError
from longctx.kv.spec import KVSpec

log = logging.getLogger("longctx.engine")


class EngineStoppedError(LongctxError):
    """The engine is shutting down and takes no new requests."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._sinks: dict[str, _Stream] = {}
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
            self._hand_over(outs)

    def _hand_over(self, finals: list[RequestOutput]) -> None:
        """Give every stream what this step added: its final output, or its new token ids; one wake-up of each
        event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput | list[int]]]] = {}
        with self._sinks_lock:  # a snapshot: the event loop never waits for the engine's lock here
            sinks = dict(self._sinks)
        with self.engine._lock:  # the engine's: no abort from another thread in between
            for out in finals:
                sink = sinks.get(out.request_id)
                if sink is not None and not sink.done:
                    sink.done = True
                    by_loop.setdefault(sink.loop, []).append((sink, out))
            for sink in sinks.values():
                req = sink.req
                if req is None or sink.done or req.is_finished:  # not added yet / reported by its final output
                    continue
                n = len(req.output_ids)
                if n > sink.handed:
                    new = req.output_ids[sink.handed : n]
                    sink.handed = n
                    by_loop.setdefault(sink.loop, []).append((sink, new))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for sink, _ in items:
                    self.engine.abort(sink.request_id)

    # ---- requests ----------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams | None = None,
                       kv: str | KVSpec = "full", request_id: str | None = None, *,
                       chat: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream one completion: a :class:`RequestOutput` per step that produced tokens (``outputs[0]``
        carries ``new_token_ids`` and ``text_delta``), or, when the consumer fell behind, one for the tokens of
        all the steps since its last (their ids and text concatenated); the last one with ``finished`` set.
        The ``stats`` of an unfinished output hold token counts and timings (no KV figures). Errors in the
        request (a bad prompt or spec, a full queue) raise before the first output."""
        if not self.accepting:
            raise EngineStoppedError("the engine is shutting down")
        rid = request_id or f"req-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        sink = _Stream(rid, loop)
        with self._sinks_lock:
            if rid in self._sinks:
                raise LongctxError(f"request id {rid!r} is already in use")
            self._sinks[rid] = sink
        finished = added = False
        try:
            # off the event loop: adding takes the engine's lock, which a running step holds
            adding = asyncio.ensure_future(asyncio.to_thread(self._add, prompt, params, kv, sink, chat))
            try:
                await asyncio.shield(adding)
            except asyncio.CancelledError:  # it may still be added: abort it once it is
                adding.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or self._abort_soon(rid))
                raise
            added = True
            sink.start(self.engine.tokenizer)
            self._wake.set()
            while not finished:
                if sink.final is None and not sink.pending:
                    sink.waiter = loop.create_future()
                    await sink.waiter
                    continue
                out = sink.take()
                finished = out.finished
                yield out
        finally:
            with self._sinks_lock:
                self._sinks.pop(rid, None)
            if added and not finished:  # a refused request was never ours: its id may be another's
                self._abort_soon(rid)

    def _add(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams | None, kv: str | KVSpec,
             sink: _Stream, chat: bool) -> None:
        with self._accept_lock:  # never after shutdown began: nobody would step it
            if not self.accepting:
                raise EngineStoppedError("the engine is shutting down")
            # not under the engine's lock (tokenising, building the request's KV): a step may run before
            # ``sink.req`` is set, which loses nothing (hand-over counts from token 0; a request that finished
            # meanwhile comes with the step's final outputs)
            rid = self.engine.add_request(prompt, params, kv, request_id=sink.request_id, chat=chat,
                                          stream=False)  # reported when finished; the tokens: _hand_over
            with self.engine._lock:
                sink.req = self.engine.requests.get(rid)

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


class _Stream:
    """One stream's hand-over between the engine thread (``req``, ``handed``, ``done``) and its consumer on
    the event loop (the rest): token ids handed over and not yet taken, the final output once it came, and
    what was given to the consumer so far (tokens, text, log-probability sum)."""

    __slots__ = ("cumulative", "detok", "done", "final", "handed", "hold", "ids", "loop", "pending", "req",
                 "request_id", "sent_text", "waiter")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id, self.loop = request_id, loop
        self.req: Request | None = None  # set once added (under the engine's lock)
        self.handed = 0  # output tokens handed to the event loop (engine thread)
        self.done = False  # the final output was handed over (engine thread)
        self.pending: list[int] = []  # handed over, not yet taken by the consumer
        self.final: RequestOutput | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.ids: list[int] = []  # output tokens given to the consumer
        self.sent_text = 0  # characters of text given to the consumer
        self.cumulative = 0.0
        self.detok: IncrementalDetokenizer | None = None
        self.hold = 0

    def start(self, tokenizer: Any) -> None:
        req = self.req
        if req is None:  # it finished before it was looked up: only its final output comes
            return
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.hold = max(map(len, req.params.stop)) - 1 if req.params.stop else 0

    def take(self) -> RequestOutput:
        """The next output for the consumer: the final one, with its deltas counted from what was given
        (so pending tokens merge into it), else one for every token handed over since the last."""
        final = self.final
        if final is not None:
            comp = final.outputs[0]
            comp.new_token_ids = comp.token_ids[len(self.ids) :]
            comp.text_delta = comp.text[self.sent_text :] if len(comp.text) > self.sent_text else ""
            return final
        req = self.req
        assert req is not None
        new, self.pending = self.pending, []
        start = len(self.ids)
        self.ids.extend(new)
        text = ""
        if self.detok is not None:  # as LLMEngine.output: decoded incrementally, a possible stop string held back
            self.detok.push(self.ids)
            text = self.detok.text
            if self.hold:
                text = text[: max(len(text) - self.hold, 0)]
        delta = text[self.sent_text :] if len(text) > self.sent_text else ""
        self.sent_text = max(self.sent_text, len(text))
        cumulative = None
        if req.logprobs is not None:
            lps = req.logprobs
            for k, t in enumerate(new):  # one at a time, in the engine's order of additions
                self.cumulative += lps[start + k][t]
            cumulative = self.cumulative
        ids = list(self.ids)
        stats = _token_stats(req, len(ids))
        comp = CompletionOutput(0, text, ids, "", stats, req.logprobs, cumulative, new_token_ids=new,
                                text_delta=delta)
        return RequestOutput(req.prompt, text, ids, req.kv.spec_text, stats, request_id=self.request_id,
                             prompt_token_ids=req.prompt_ids, outputs=[comp], prompt_logprobs=req.prompt_logprobs,
                             finished=False)


def _token_stats(req: Request, generated: int) -> RequestStats:
    """Cheap stats of an unfinished stream: token counts and the timings so far (no KV figures)."""
    first = req.first_token_time or req.start_time
    now = time.perf_counter()
    return RequestStats(prompt_tokens=len(req.prompt_ids), generated_tokens=generated,
                        time_to_first_token=first - req.start_time,
                        time_per_output_token=(now - first) / max(generated - 1, 1),
                        queue_time=(req.first_scheduled_time or first) - req.start_time,
                        num_preemptions=req.num_preemptions)


def _deliver(items: list[tuple[_Stream, RequestOutput | list[int]]]) -> None:
    """On the event loop: one step's hand-over (merged into what its consumers have not taken yet)."""
    for sink, payload in items:
        if isinstance(payload, RequestOutput):
            sink.final = payload
        else:
            sink.pending.extend(payload)
        waiter = sink.waiter
        if waiter is not None:
            sink.waiter = None
            if not waiter.done():
                waiter.set_result(None)
