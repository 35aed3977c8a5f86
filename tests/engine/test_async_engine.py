"""``AsyncLLMEngine``: the engine stepping on its own thread behind asyncio streams. Streams reassemble to
the non-streamed result, run concurrently, abort when their consumer leaves (break, cancellation) or the
engine shuts down, and report bad requests before any output."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator

import pytest

from longctx import LLM, LongctxError, SamplingParams
from longctx.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from longctx.engine.request import RequestOutput
from longctx.errors import QueueFullError, RequestTooLargeError, SpecError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):  # noqa: ANN001, ANN201
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def reference(folder) -> LLM:  # noqa: ANN001
    """Non-streamed results come from a separate LLM: the async engine's thread owns its engine's steps."""
    return LLM(folder)


@pytest.fixture
def make_async(folder) -> Iterator[Callable[..., AsyncLLMEngine]]:  # noqa: ANN001
    """``make(**LLM kwargs)``: an AsyncLLMEngine over a fresh LLM; its thread is stopped after the test."""
    made: list[AsyncLLMEngine] = []

    def make(**kwargs) -> AsyncLLMEngine:  # noqa: ANN003
        eng = AsyncLLMEngine(LLM(folder, **kwargs).engine)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown(timeout=0)
        assert not eng._thread.is_alive()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


async def _collect(eng: AsyncLLMEngine, prompt: str | list[int], params: SamplingParams, kv: str = "full",
                   **kwargs) -> list[RequestOutput]:  # noqa: ANN003
    return [out async for out in eng.generate(prompt, params, kv, **kwargs)]


async def _until(cond: Callable[[], bool], what: str, tries: int = 2000) -> None:
    """Let the engine thread work until ``cond()`` holds (a bound on tries, not a timing assert)."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


def _check_stream(outs: list[RequestOutput], expected: RequestOutput) -> None:
    assert outs and outs[-1].finished and not any(o.finished for o in outs[:-1])
    final = outs[-1]
    assert final.outputs[0].finish_reason == expected.outputs[0].finish_reason
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == final.token_ids == expected.token_ids
    assert "".join(o.outputs[0].text_delta for o in outs) == final.text == expected.text
    assert all(o.request_id == final.request_id for o in outs)


def test_stream_deltas_reassemble_to_the_non_streamed_text(make_async, reference: LLM) -> None:  # noqa: ANN001
    eng = make_async()
    prompts = ["hello there", "The quick brown fox jumps over", "\u00e9t\u00e9 \u2603 caf\u00e9"]  # multi-byte text

    async def main() -> list[list[RequestOutput]]:
        return [await _collect(eng, p, _greedy(24)) for p in prompts]

    for prompt, outs in zip(prompts, asyncio.run(main()), strict=True):
        expected = reference.generate(prompt, _greedy(24))[0]
        _check_stream(outs, expected)
        assert len(outs) >= 2  # streamed over several steps, not in one piece
    # a stop string: the held-back text never leaks into a delta
    stop = SamplingParams(max_tokens=30, ignore_eos=True, stop=[reference.generate("abc", _greedy(30))[0].text[5:8]])
    outs = asyncio.run(_collect(eng, "abc", stop))
    _check_stream(outs, reference.generate("abc", stop)[0])
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert eng.engine.pool.num_used_blocks == 0 and eng.num_unfinished == 0


def test_concurrent_streams(make_async, reference: LLM) -> None:  # noqa: ANN001
    eng = make_async(max_num_batched_tokens=32)
    rng = random.Random(0)
    specs = ["full", "snapkv:16", "streamingllm:24", "h2o:16", "full prefill=chunked(size=7)", "int8"]
    jobs = [([rng.randrange(3, 250) for _ in range(rng.randrange(5, 80))], spec) for spec in specs]
    sampled = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    steps_before = eng.engine.num_steps

    async def main() -> list[list[RequestOutput]]:
        streams = [_collect(eng, p, _greedy(16), kv=s) for p, s in jobs]
        streams.append(_collect(eng, jobs[0][0], sampled, request_id="sampled"))
        return await asyncio.gather(*streams)

    results = asyncio.run(main())
    for (prompt, spec), outs in zip(jobs, results[:-1], strict=True):
        _check_stream(outs, reference.generate(prompt, _greedy(16), kv=spec)[0])
    _check_stream(results[-1], reference.generate(jobs[0][0], sampled)[0])
    assert results[-1][-1].request_id == "sampled"
    assert len({outs[-1].request_id for outs in results}) == len(results)
    # they ran batched: far fewer steps than one stream after another
    assert eng.engine.num_steps - steps_before < sum(len(outs) for outs in results)
    assert eng.engine.pool.num_used_blocks == 0 and eng.engine.requests == {} and eng.num_unfinished == 0


def test_leaving_the_stream_early_aborts_and_frees_blocks(make_async, monkeypatch) -> None:  # noqa: ANN001
    eng = make_async()
    aborts: list[tuple[str, bool]] = []
    abort = eng.engine.abort

    def recording_abort(rid: str) -> bool:
        ok = abort(rid)
        aborts.append((rid, ok))
        return ok

    monkeypatch.setattr(eng.engine, "abort", recording_abort)
    lock = eng.engine._lock  # held by this thread, it pauses the engine thread between steps

    async def leave_by_break() -> None:
        seen = 0
        async for out in eng.generate([7] * 10, _greedy(200), request_id="leaver"):
            assert not out.finished
            seen += 1
            if seen == 2:
                with lock:
                    assert eng.engine.pool.num_used_blocks > 0
                break  # the abort is applied by the engine thread at its next step (198 tokens before the end)
        await _until(lambda: bool(aborts), "the stream left by break was aborted")

    asyncio.run(leave_by_break())
    assert aborts == [("leaver", True)]
    assert eng.engine.pool.num_used_blocks == 0 and eng.num_unfinished == 0

    async def leave_by_cancel() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in eng.generate([9] * 10, _greedy(200), request_id="cancelled"):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        with lock:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await _until(lambda: not eng.engine.has_unfinished_requests(), "the abort was reported")

    asyncio.run(leave_by_cancel())
    assert aborts[-1] == ("cancelled", True)
    assert eng.engine.pool.num_used_blocks == 0 and eng.engine.requests == {} and eng.num_unfinished == 0

    # the engine keeps serving; an id is free again once its stream is gone
    outs = asyncio.run(_collect(eng, [7] * 10, _greedy(3), request_id="leaver"))
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].token_ids) == 3


def test_shutdown_aborts_in_flight_requests_and_stops_the_thread(make_async) -> None:  # noqa: ANN001
    eng = make_async()

    async def main() -> tuple[list[list[RequestOutput]], list[RequestOutput]]:
        started = [asyncio.Event() for _ in range(3)]

        async def consume(i: int) -> list[RequestOutput]:
            outs = []
            async for out in eng.generate([5 + i] * 12, _greedy(230)):
                outs.append(out)
                started[i].set()
            return outs

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        for ev in started:
            await ev.wait()
        with eng.engine._lock:  # all three are mid-decode (none can finish in between)
            assert len(eng.engine.requests) == 3 and all(not r.is_finished for r in eng.engine.requests.values())
        short = asyncio.create_task(_collect(eng, [3] * 4, _greedy(2)))
        await asyncio.sleep(0)
        eng.shutdown(timeout=0)
        streams = list(await asyncio.gather(*tasks))
        try:
            return streams, await short
        except EngineStoppedError:  # submitted while shutting down: refused, never half-run
            return streams, None

    streams, short = asyncio.run(main())
    assert not eng._thread.is_alive() and not eng.accepting
    for outs in streams:
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert 1 <= len(outs[-1].token_ids) < 230
    assert short is None or (short[-1].finished and short[-1].outputs[0].finish_reason in ("abort", "length"))
    assert eng.engine.pool.num_used_blocks == 0 and eng.engine.requests == {} and eng.num_unfinished == 0
    assert not eng.engine.has_unfinished_requests()
    with pytest.raises(EngineStoppedError):
        asyncio.run(_collect(eng, "late", _greedy(2)))


def test_shutdown_lets_running_requests_finish_within_the_timeout(make_async) -> None:  # noqa: ANN001
    eng = make_async()

    async def main() -> list[RequestOutput]:
        task = asyncio.create_task(_collect(eng, [4] * 6, _greedy(5)))
        await _until(lambda: eng.num_unfinished == 1, "the request was added")
        await asyncio.to_thread(eng.shutdown, 60.0)
        return await task

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].token_ids) == 5
    assert not eng._thread.is_alive() and eng.engine.pool.num_used_blocks == 0


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"kv": "nonsense:3"}, SpecError, "nonsense"),
    ({"kv": "snapkv:-3"}, SpecError, "snapkv"),
    ({"prompt": []}, LongctxError, "empty prompt"),
    ({"prompt": [1, 10_000]}, LongctxError, "out of range"),
    ({"params": "greedy"}, LongctxError, "SamplingParams"),
    ({"params": SamplingParams(max_tokens=2, n=2)}, LongctxError, "n=2"),
    ({"prompt": [5] * 200, "params": SamplingParams(max_tokens=40)}, RequestTooLargeError, "pool holds"),
])
def test_a_bad_request_raises_before_any_output(make_async, kwargs: dict, error: type, message: str) -> None:  # noqa: ANN001
    eng = make_async(max_kv_bytes=61 * 2048)  # 60 blocks: 160 tokens of full KV
    args = {"prompt": [5, 6, 7], "params": _greedy(2), "kv": "full", **kwargs}
    got: list[RequestOutput] = []

    async def main() -> None:
        async for out in eng.generate(args["prompt"], args["params"], args["kv"]):
            got.append(out)

    with pytest.raises(error, match=message):
        asyncio.run(main())
    assert got == [] and eng.num_unfinished == 0 and eng.engine.requests == {}
    assert eng.engine.pool.num_used_blocks == 0 and not eng.engine.has_unfinished_requests()
    outs = asyncio.run(_collect(eng, [5, 6, 7], _greedy(2)))  # the engine still serves
    assert outs[-1].outputs[0].finish_reason == "length"


def test_duplicate_ids_and_a_full_queue_are_refused(make_async) -> None:  # noqa: ANN001
    eng = make_async(max_waiting=1, max_num_seqs=1)

    async def main() -> None:
        first = eng.generate([5] * 8, _greedy(200), request_id="a")
        await first.__anext__()  # "a" runs and holds the only seat
        second = eng.generate([6] * 8, _greedy(3), request_id="b")
        waiting = asyncio.create_task(second.__anext__())
        await _until(lambda: eng.engine.stats().waiting == 1, "b waits: the queue (of one) is full")
        with pytest.raises(LongctxError, match="already in use"):
            await _collect(eng, [6] * 8, _greedy(3), request_id="a")
        with pytest.raises(QueueFullError):
            await _collect(eng, [6] * 8, _greedy(3), request_id="c")
        assert eng.num_unfinished == 2 and set(eng.engine.requests) == {"a", "b"}
        outs_a = [out async for out in first]
        outs_b = [await waiting] + [out async for out in second]
        assert outs_a[-1].finished and outs_a[-1].outputs[0].finish_reason == "length"
        assert outs_b[-1].finished and len(outs_b[-1].token_ids) == 3

    asyncio.run(main())
    assert eng.engine.pool.num_used_blocks == 0 and eng.num_unfinished == 0


def test_a_refused_duplicate_id_leaves_the_engine_request_alone(make_async) -> None:  # noqa: ANN001
    """An id taken by a request added to the engine directly: the stream is refused, the other request runs on."""
    eng = make_async()

    async def main() -> None:
        eng.engine.add_request([5] * 8, _greedy(200), request_id="x", stream=False)
        other = eng.engine.requests["x"]
        with pytest.raises(LongctxError, match="already in use"):
            await _collect(eng, [6] * 8, _greedy(3), request_id="x")
        assert eng.engine.requests.get("x") is other or other.is_finished
        eng._wake.set()
        await _until(lambda: other.is_finished, "the engine's own request finished")
        assert other.finish_reason == "length" and len(other.output_ids) == 200

    asyncio.run(main())
    assert eng.engine.pool.num_used_blocks == 0 and eng.num_unfinished == 0


def test_generate_beside_a_background_engine_keeps_both(tiny_checkpoint) -> None:  # noqa: ANN001
    """``LLM.generate`` on an engine an AsyncLLMEngine is stepping waits for its own requests instead of stepping,
    so the streams still get every output; afterwards generate steps the engine itself again."""
    import asyncio  # noqa: PLC0415

    from longctx.engine.async_engine import AsyncLLMEngine  # noqa: PLC0415
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415

    llm = LLM(tiny_checkpoint("llama")[0])
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], params)[0].token_ids
    eng = AsyncLLMEngine(llm.engine)

    async def main() -> tuple[list[int], list[int]]:
        async def stream() -> list[int]:
            ids: list[int] = []
            async for out in eng.generate([5, 6, 7, 8], params):
                ids.extend(out.outputs[0].new_token_ids)
            return ids

        task = asyncio.create_task(stream())
        offline = await asyncio.to_thread(lambda: llm.generate([[5, 6, 7, 8]], params)[0].token_ids)
        return await task, offline

    try:
        streamed, offline = asyncio.run(main())
    finally:
        eng.shutdown(5)
    assert streamed == alone and offline == alone
    assert llm.engine.background is None and llm.generate([[5, 6, 7, 8]], params)[0].token_ids == alone
    assert llm.pool.num_used_blocks == 0


def test_a_slow_consumer_gets_the_steps_it_missed_merged(make_async, reference: LLM) -> None:  # noqa: ANN001
    """A consumer that falls behind the engine gets one output for several steps' tokens (ids and text
    concatenated, log-probabilities accumulated), and the stream still reassembles to the non-streamed result."""
    eng = make_async()
    params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)

    async def main() -> list[RequestOutput]:
        outs = []
        async for out in eng.generate("slow reader", params):
            outs.append(out)
            if len(outs) == 1:  # let the engine run ahead of us
                await _until(lambda: len(eng.engine.requests) == 0 or
                             len(next(iter(eng.engine.requests.values())).output_ids) >= 10, "ten tokens")
        return outs

    outs = asyncio.run(main())
    expected = reference.generate("slow reader", params)[0]
    _check_stream(outs, expected)
    assert len(outs) < len(expected.token_ids)  # merged
    assert max(len(o.outputs[0].new_token_ids) for o in outs) >= 5
    for o in outs:  # each output's cumulative log-probability is that of the tokens given so far
        got = o.outputs[0]
        assert got.cumulative_logprob == pytest.approx(
            sum(lp[t] for lp, t in zip(expected.outputs[0].logprobs, got.token_ids, strict=False)), abs=1e-4)
    assert eng.engine.pool.num_used_blocks == 0 and eng.num_unfinished == 0
