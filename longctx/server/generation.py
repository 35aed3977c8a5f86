"""The engine requests of one HTTP request (its n choices x prompts), run together and torn down together.

:class:`Run` starts one ``AsyncLLMEngine.generate`` stream per choice, each pumped by its own task into one
queue, so outputs of all choices come out in arrival order. :meth:`Run.start` waits until every choice
was admitted (its first output arrived) or one was refused (full queue, prompt too long, ...), in which case
the others are aborted and the refusal is raised as an :class:`~longctx.server.errors.APIError`: the HTTP
status is decided before a byte is sent. :meth:`Run.close` cancels whatever is still running; the engine
streams' own ``finally`` aborts those requests, which frees their KV blocks at once. Metrics are recorded
here, once per choice, whatever way it ended.

A request with a single choice (the common case) skips the pump: its engine stream is iterated directly
by whoever consumes the outputs, one task switch less per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from longctx.engine.async_engine import AsyncLLMEngine
from longctx.engine.request import RequestOutput
from longctx.server.aio import cancel_and_wait
from longctx.server.errors import APIError, from_engine_error
from longctx.server.inputs import Plan
from longctx.server.metrics import Metrics


class Run:
    def __init__(self, engine: AsyncLLMEngine, plan: Plan, request_id: str, metrics: Metrics) -> None:
        self.engine, self.plan, self.request_id, self.metrics = engine, plan, request_id, metrics
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._gen: AsyncIterator[RequestOutput] | None = None  # the stream of a single choice (no pump)
        self._buffer: list[tuple[int, RequestOutput]] = []
        n = len(plan.choices)
        self.last: list[RequestOutput | None] = [None] * n  # latest output of each choice
        self.admitted = [False] * n
        self.finished = [False] * n
        self._recorded = [False] * n
        self._start_time = time.perf_counter()

    # ---- starting -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Submit every choice; return once each is admitted. On a refusal: abort the rest, raise APIError."""
        if len(self.plan.choices) == 1:
            return await self._start_one()
        for i, (p, params) in enumerate(self.plan.choices):
            gen = self.engine.generate(self.plan.prompts[p], params, kv=self.plan.spec,
                                       request_id=f"{self.request_id}-{i}")
            self._tasks.append(asyncio.create_task(self._pump(i, gen)))
        waiting = set(range(len(self._tasks)))
        try:
            while waiting:
                i, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise from_engine_error(item)  # type: ignore[arg-type]
                if item is None:  # a stream ended: one admitted earlier may finish before the others start
                    if self.admitted[i]:
                        continue
                    raise APIError(500, "the engine ended a request without output", type="server_error")
                if not self.admitted[i]:
                    self.admitted[i] = True
                    self.metrics.observe_admitted(len(self.plan.prompts[self.plan.choices[i][0]]))
                    waiting.discard(i)
                self._note(i, item)
                self._buffer.append((i, item))
        except BaseException:
            await self.close()
            raise

    async def _start_one(self) -> None:
        p, params = self.plan.choices[0]
        self._gen = self.engine.generate(self.plan.prompts[p], params, kv=self.plan.spec,
                                         request_id=f"{self.request_id}-0")
        try:
            out = await self._gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine ended a request without output", type="server_error") from None
        except Exception as e:  # refused at admission; the stream has closed itself
            raise from_engine_error(e) from None
        self.admitted[0] = True
        self.metrics.observe_admitted(len(self.plan.prompts[p]))
        self._note(0, out)
        self._buffer.append((0, out))

    async def _pump(self, i: int, gen: AsyncIterator[RequestOutput]) -> None:
        async with contextlib.aclosing(gen):  # type: ignore[type-var]
            try:
                async for out in gen:
                    self._queue.put_nowait((i, out))
            except Exception as e:  # refused at admission (or a bug): reported to the consumer
                self._queue.put_nowait((i, e))
                return
        self._queue.put_nowait((i, None))

    # ---- consuming ------------------------------------------------------------------------------------
    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they arrive, the outputs seen by :meth:`start` first, until every
        choice has finished."""
        buffered, self._buffer = self._buffer, []
        for item in buffered:
            yield item
        if self._gen is not None:
            while not self.finished[0]:
                out = await self._gen.__anext__()
                self._note(0, out)
                yield 0, out
            return
        while not all(self.finished):
            i, item = await self._queue.get()
            if item is None:
                continue
            if isinstance(item, BaseException):
                raise APIError(500, f"the engine failed: {type(item).__name__}: {item}", type="server_error")
            self._note(i, item)
            yield i, item

    async def final_outputs(self) -> list[RequestOutput]:
        """Run every choice to the end; their last outputs, in choice order."""
        async for _ in self.outputs():
            pass
        return [out for out in self.last if out is not None]

    def _note(self, i: int, out: RequestOutput) -> None:
        self.last[i] = out
        if out.finished and not self.finished[i]:
            self.finished[i] = True
            self._record(i, out.outputs[0].finish_reason or "stop")

    def _record(self, i: int, reason: str) -> None:
        if self._recorded[i] or not self.admitted[i]:
            return
        self._recorded[i] = True
        out = self.last[i]
        stats = out.stats if out is not None else None
        generated = stats.generated_tokens if stats is not None else 0
        self.metrics.observe_finished(
            self.plan.spec_text, reason, generated,
            ttft=stats.time_to_first_token if stats is not None and generated >= 1 else None,
            tpot=stats.time_per_output_token if stats is not None and generated >= 2 else None,
            e2e=time.perf_counter() - self._start_time)

    # ---- tearing down ---------------------------------------------------------------------------------
    async def close(self) -> None:
        """Cancel every choice still running (their engine requests are aborted, their blocks freed)."""
        if self._gen is not None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: still running in a task being cancelled
                await self._gen.aclose()  # type: ignore[attr-defined]
        try:
            await cancel_and_wait(*self._tasks)
        finally:
            for i in range(len(self.plan.choices)):
                if not self.finished[i]:
                    self._record(i, "abort")
