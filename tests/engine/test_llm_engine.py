"""The persistent engine (``LLMEngine``): add / step / abort / stats, memory accounting under pressure
(preemption + recompute, queue bounds, requests larger than the pool, compressed long prompts in a small
pool), chunk interleaving without starvation, mixed KV specs in one batch and shared prefixes.

The tiny Llama has 3 layers x 2 KV heads, so a request holds 6 rows of 16-token blocks of 2 KiB each."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from longctx import LLM, LongctxError, SamplingParams
from longctx.engine.llm_engine import LLMEngine
from longctx.engine.request import Request, RequestOutput
from longctx.errors import QueueFullError, RequestTooLargeError
from longctx.kv.spec import KVSpec

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BLOCK_BYTES = 2 * 16 * 16 * 4  # K and V, 16 tokens, head_dim 16, fp32


def _pool_bytes(blocks: int) -> int:
    """``max_kv_bytes`` for a pool of ``blocks`` usable blocks (+ the null block)."""
    return (blocks + 1) * BLOCK_BYTES


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _drain(llm: LLM, max_steps: int = 5000) -> dict[str, list[RequestOutput]]:
    """Step until idle; every report per request id, pool invariants checked after every step."""
    reports: dict[str, list[RequestOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not llm.engine.has_unfinished_requests():
            return reports
        for out in llm.engine.step():
            reports[out.request_id].append(out)
        llm.pool.check_invariants()
        assert llm.pool.num_used_blocks <= llm.engine.kv.capacity_blocks
    raise AssertionError(f"the engine did not become idle in {max_steps} steps")


def _final(reports: dict[str, list[RequestOutput]], rid: str) -> RequestOutput:
    """The one finished report of ``rid`` (and nothing reported after it)."""
    outs = reports[rid]
    finished = [o for o in outs if o.finished]
    assert len(finished) == 1, f"{rid} finished {len(finished)} times"
    assert outs[-1] is finished[0], f"{rid} reported after finishing"
    return finished[0]


def _no_quant_blocks(llm: LLM) -> bool:
    return all(qp.num_used_blocks == 0 for qp in llm.pool.quant_pools.values())


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):  # noqa: ANN001, ANN201
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def big(folder) -> LLM:  # noqa: ANN001
    """A roomy pool: references for requests run alone."""
    return LLM(folder)


def _alone(llm: LLM, prompt: list[int], params: SamplingParams, spec: str) -> list[int]:
    out = llm.generate(prompt, params, kv=spec)[0]
    assert out.stats.num_preemptions == 0
    return out.token_ids


# ---- the API --------------------------------------------------------------------------------------
def test_add_step_stats_and_request_ids(folder, big: LLM) -> None:  # noqa: ANN001
    llm = LLM(folder, max_kv_bytes=_pool_bytes(60))
    eng = llm.engine
    st = eng.stats()
    assert (st.running, st.waiting, st.preempted, st.blocks_used, st.steps) == (0, 0, 0, 0, 0)
    assert st.blocks_total == 60 and st.blocks_free == 60 and st.kv_bytes_used == 0
    assert not eng.has_unfinished_requests() and eng.step() == []

    rng = random.Random(0)
    prompts = [_ids(rng, n) for n in (5, 12, 30)]
    auto = [eng.add_request(p, _greedy(4)) for p in prompts[:2]]
    mine = eng.add_request(prompts[2], _greedy(6), kv="snapkv:16", request_id="mine", stream=False)
    assert mine == "mine" and len(set(auto)) == 2 and "mine" not in auto
    with pytest.raises(LongctxError, match="already in use"):
        eng.add_request(prompts[0], _greedy(4), request_id="mine")
    with pytest.raises(LongctxError, match="already in use"):  # a batch with one taken id adds nothing
        eng.add_requests([eng.make_request(prompts[0], _greedy(2), KVSpec.parse("full"), request_id="fresh"),
                          eng.make_request(prompts[1], _greedy(2), KVSpec.parse("full"), request_id=auto[0])])
    assert "fresh" not in eng.requests
    st = eng.stats()
    assert (st.running, st.waiting, st.blocks_used) == (0, 3, 0)
    assert eng.has_unfinished_requests()

    first = eng.step()
    st = eng.stats()
    assert st.steps == 1 and st.running == 3 and st.waiting == 0
    assert st.blocks_used == llm.pool.num_used_blocks > 0
    assert st.blocks_used + st.blocks_free == st.blocks_total == 60
    assert st.kv_bytes_used == st.blocks_used * llm.pool.bytes_per_block
    # streamed requests report their first token; the non-streamed one only when it finishes
    assert sorted(o.request_id for o in first) == sorted(auto)
    assert all(not o.finished and len(o.outputs[0].new_token_ids) == 1 for o in first)

    reports = _drain(llm)
    for o in first:
        reports[o.request_id].insert(0, o)
    for rid, prompt, n in ((auto[0], prompts[0], 4), (auto[1], prompts[1], 4)):
        final = _final(reports, rid)
        assert final.outputs[0].finish_reason == "length" and len(final.token_ids) == n
        streamed = [t for o in reports[rid] for t in o.outputs[0].new_token_ids]
        assert streamed == final.token_ids == _alone(big, prompt, _greedy(n), "full")
        assert "".join(o.outputs[0].text_delta for o in reports[rid]) == final.text
    assert len(reports["mine"]) == 1 and _final(reports, "mine").token_ids == \
        _alone(big, prompts[2], _greedy(6), "snapkv:16")
    st = eng.stats()
    assert (st.running, st.waiting, st.blocks_used, st.blocks_free) == (0, 0, 0, 60)
    assert st.tokens_per_second > 0 and st.steps == eng.num_steps > 1
    assert eng.requests == {} and not eng.has_unfinished_requests()
    # unknown and finished ids: nothing to abort; a finished id may be used again
    assert eng.abort("nope") is False and eng.abort("mine") is False
    assert eng.add_request(prompts[0], _greedy(1), request_id="mine") == "mine"
    assert _final(_drain(llm), "mine").outputs[0].finish_reason == "length"


@pytest.mark.parametrize("spec", ["full", "snapkv:16", "full prefill=chunked(size=7)", "int8"])
def test_abort_mid_prefill_and_mid_decode_frees_everything(folder, spec: str) -> None:  # noqa: ANN001
    llm = LLM(folder, max_num_batched_tokens=16)  # a 100-token prompt prefills over several steps
    eng = llm.engine
    rng = random.Random(1)
    decoding = eng.add_request(_ids(rng, 10), _greedy(50), kv=spec)
    prefilling = eng.add_request(_ids(rng, 100), _greedy(5), kv=spec)
    reports: dict[str, list[RequestOutput]] = defaultdict(list)
    for _ in range(3):
        for o in eng.step():
            reports[o.request_id].append(o)
    a, b = eng.requests[prefilling], eng.requests[decoding]
    assert a.is_prefill and 0 < a.num_computed_tokens < a.num_prompt_tokens  # mid-prefill
    assert 1 <= len(b.output_ids) < 50 and not b.is_prefill  # mid-decode
    assert eng.abort(prefilling) is True
    assert eng.abort(prefilling) is False  # already ended
    assert a.kv.rows.num_blocks == 0 and a not in eng.scheduler.running
    assert eng.abort(decoding) is True
    assert llm.pool.num_used_blocks == 0 and _no_quant_blocks(llm)  # freed at once, before the next step
    assert eng.has_unfinished_requests()  # the aborts are still to be reported
    for rid, out in _drain(llm).items():
        reports[rid].extend(out)
    assert set(reports) <= {prefilling, decoding}
    for rid in (prefilling, decoding):
        final = _final(reports, rid)
        assert final.outputs[0].finish_reason == "abort" == final.stats.finish_reason
    assert _final(reports, decoding).token_ids == b.output_ids and len(b.output_ids) >= 1
    assert eng.requests == {} and not eng.scheduler.waiting and not eng.scheduler.running
    assert llm.pool.num_used_blocks == 0 and _no_quant_blocks(llm)
    assert eng.step() == []


def test_abort_waiting_and_shared_prefix_children(folder) -> None:  # noqa: ANN001
    """Aborting requests that wait (behind others, or for a shared prefix being computed) frees the prefix
    once the last of its users is gone; nothing internal is reported or kept."""
    llm = LLM(folder, max_num_batched_tokens=32)
    eng = llm.engine
    rng = random.Random(2)
    ctx = _ids(rng, 150)
    reqs = [eng.make_request(ctx + _ids(rng, 6), _greedy(4), KVSpec.parse("full"), request_id=f"q{i}")
            for i in range(3)]
    eng.add_requests(reqs, share_prefix=True)
    prefix = [r for r in eng.scheduler.waiting if r.prefill_only]
    assert len(prefix) == 1 and prefix[0].pending_children == 3  # the shared prefix is a request of its own
    assert set(eng.requests) == {"q0", "q1", "q2"}  # ... the engine's, not the caller's
    eng.step()
    eng.step()
    assert all(r.parent is not None and r.parent.is_prefill for r in reqs)  # they wait for the prefix
    assert llm.pool.num_used_blocks > 0
    for r in reqs:
        assert eng.abort(r.request_id)
    assert llm.pool.num_used_blocks == 0
    reports = _drain(llm)
    assert set(reports) == {"q0", "q1", "q2"}
    assert all(_final(reports, f"q{i}").outputs[0].finish_reason == "abort" for i in range(3))
    assert not eng.scheduler.waiting and not eng.scheduler.running
    assert eng.requests == {}


def test_shared_prefix_requests_are_forgotten(folder) -> None:  # noqa: ANN001
    llm = LLM(folder)
    rng = random.Random(3)
    ctx = _ids(rng, 140)
    llm.generate([ctx + _ids(rng, 5), ctx + _ids(rng, 9)], _greedy(3))
    assert llm.engine.requests == {} and llm.pool.num_used_blocks == 0


# ---- bounds ---------------------------------------------------------------------------------------
def test_queue_bound_rejects_cleanly(folder) -> None:  # noqa: ANN001
    llm = LLM(folder, max_waiting=2)
    eng = llm.engine
    rng = random.Random(4)
    prompts = [_ids(rng, 8) for _ in range(5)]
    a = eng.add_request(prompts[0], _greedy(3))
    b = eng.add_request(prompts[1], _greedy(3))
    with pytest.raises(QueueFullError, match="queue is full"):
        eng.add_request(prompts[2], _greedy(3), request_id="late")
    assert "late" not in eng.requests and eng.stats().waiting == 2 and llm.pool.num_used_blocks == 0
    with pytest.raises(QueueFullError):  # LLM.generate goes through the same bound
        llm.generate(prompts[2:4], _greedy(3))
    assert len(eng.requests) == 2 and eng.stats().waiting == 2
    eng.step()  # both admitted: the queue is empty again
    assert eng.stats().waiting == 0
    assert eng.add_request(prompts[2], _greedy(3), request_id="late") == "late"  # the id was never taken
    batch = [eng.make_request(p, _greedy(3), KVSpec.parse("full")) for p in prompts[3:5]]
    with pytest.raises(QueueFullError):  # 1 waiting + 2 > 2: the whole batch is refused
        eng.add_requests(batch)
    assert all(r.request_id not in eng.requests for r in batch) and eng.stats().waiting == 1
    reports = _drain(llm)
    assert set(reports) == {a, b, "late"}
    assert all(_final(reports, rid).outputs[0].finish_reason == "length" for rid in reports)
    assert llm.pool.num_used_blocks == 0 and eng.requests == {}
    # a shared prefix is internal: two prompts sharing one fill a queue of two, not three
    ctx = _ids(rng, 140)
    outs = llm.generate([ctx + [5], ctx + [6, 7]], _greedy(2))
    assert [len(o.token_ids) for o in outs] == [2, 2] and llm.pool.num_used_blocks == 0
    with pytest.raises(LongctxError, match="max_waiting"):
        LLM(folder, max_waiting=0)


def test_request_larger_than_the_pool_is_refused(folder) -> None:  # noqa: ANN001
    llm = LLM(folder, max_kv_bytes=_pool_bytes(30))  # 30 blocks = 5 per row = 80 tokens of full KV
    eng = llm.engine
    rng = random.Random(5)
    prompt = _ids(rng, 70)
    with pytest.raises(RequestTooLargeError, match="pool holds"):
        eng.add_request(prompt, _greedy(20), request_id="huge")
    with pytest.raises(RequestTooLargeError):
        llm.generate(prompt, _greedy(20))
    assert eng.requests == {} and not eng.has_unfinished_requests() and llm.pool.num_used_blocks == 0
    assert eng.add_request(prompt, _greedy(10), request_id="fits") == "fits"  # 80 tokens: exactly the pool
    assert eng.add_request(prompt, _greedy(20), kv="snapkv:16", request_id="compressed") == "compressed"
    reports = _drain(llm)
    assert _final(reports, "fits").outputs[0].finish_reason == "length"
    assert len(_final(reports, "compressed").token_ids) == 20
    assert llm.pool.num_used_blocks == 0


# ---- preemption -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["full", "snapkv:16", "full prefill=chunked(size=7)", "h2o:16 int8",
                                  "streamingllm:24"])
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_preemption_and_recompute_give_the_same_tokens(folder, big: LLM, spec: str, seeded: bool,  # noqa: ANN001
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A full request that keeps growing forces the later ones (of ``spec``) out mid-decode; recomputed,
    they end exactly as when run alone."""
    rng = random.Random(6)

    def params(n: int, i: int) -> SamplingParams:
        if seeded:
            return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.9, top_k=50, seed=100 + i)
        return _greedy(n)

    jobs = [(_ids(rng, 16), params(100, 0), "full")]  # the pressure: grows to 48 of the 50 blocks
    jobs += [(_ids(rng, rng.randrange(20, 40)), params(60, i), spec) for i in range(1, 5)]
    expected = [_alone(big, p, sp, s) for p, sp, s in jobs]

    llm = LLM(folder, max_kv_bytes=_pool_bytes(50))
    eng = llm.engine
    preempted_at: list[tuple[str, int]] = []
    preempt = eng.scheduler.preempt

    def recording_preempt(req: Request) -> None:
        preempted_at.append((req.request_id, len(req.output_ids)))
        preempt(req)

    monkeypatch.setattr(eng.scheduler, "preempt", recording_preempt)
    rids = []
    for i, (p, sp, s) in enumerate(jobs):
        rids.append(eng.add_request(p, sp, kv=s, stream=False))
        if i == 0:
            eng.step()  # the pressure request is admitted first: the others are the most recent
    reports = _drain(llm)
    finals = [_final(reports, rid) for rid in rids]
    assert eng.stats().preempted == len(preempted_at) > 0
    assert any(rid != rids[0] and n > 0 for rid, n in preempted_at), preempted_at  # mid-decode
    assert sum(f.stats.num_preemptions for f in finals) == len(preempted_at)
    assert [f.token_ids for f in finals] == expected
    assert all(f.outputs[0].finish_reason == "length" for f in finals)
    assert llm.pool.num_used_blocks == 0 and _no_quant_blocks(llm)


def test_random_mix_under_memory_pressure_equals_alone(folder, big: LLM) -> None:  # noqa: ANN001
    rng = random.Random(7)
    specs = ["full", "snapkv:16", "full prefill=chunked(size=7)", "h2o:16", "streamingllm:24",
             "snapkv:16 prefill=chunked(size=8)", "int8"]
    jobs = [(_ids(rng, rng.randrange(5, 44)), _greedy(rng.randrange(4, 24)), specs[i % len(specs)])
            for i in range(14)]
    expected = [_alone(big, *job) for job in jobs]
    llm = LLM(folder, max_kv_bytes=_pool_bytes(40), max_num_batched_tokens=48)
    rids = [llm.engine.add_request(p, sp, kv=s) for p, sp, s in jobs]
    reports = _drain(llm)
    assert llm.engine.stats().preempted > 0
    assert [_final(reports, rid).token_ids for rid in rids] == expected
    assert llm.pool.num_used_blocks == 0 and _no_quant_blocks(llm)


# ---- compressed long prompts ----------------------------------------------------------------------
def test_compressed_long_prompt_runs_in_a_pool_far_smaller_than_its_full_kv(
        folder, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("LONGCTX_ALLOW_BEYOND_CONTEXT", "1")  # the tiny context is 256 tokens
    rng = random.Random(8)
    prompt = _ids(rng, 2000)
    spec = "snapkv:32 prefill=chunked(size=64)"
    llm = LLM(folder, max_kv_bytes=_pool_bytes(60), max_num_batched_tokens=48)  # full KV: 750+ blocks
    with pytest.raises(RequestTooLargeError):
        llm.generate(prompt, _greedy(8), kv="full")
    out = llm.generate(prompt, _greedy(8), kv=spec)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.token_ids) == 8
    pool_bytes = 60 * BLOCK_BYTES
    assert out.stats.kv_bytes_full >= 2008 * 6 * 16 * 2 * 4
    assert 0 < out.stats.kv_bytes_peak <= pool_bytes < out.stats.kv_bytes_full // 10
    assert llm.pool.peak_used_blocks <= 60 and llm.pool.num_used_blocks == 0
    # the scheduler cut the 64-token chunks into 48-token pieces: eviction waited for each chunk's end
    roomy = LLM(folder, max_num_batched_tokens=8192).generate(prompt, _greedy(8), kv=spec)[0]
    assert out.token_ids == roomy.token_ids
    assert out.stats.kv_bytes_held == roomy.stats.kv_bytes_held


# ---- interleaving ---------------------------------------------------------------------------------
def test_long_prompt_interleaves_with_decodes_and_is_not_starved(folder, big: LLM,  # noqa: ANN001
                                                                  monkeypatch) -> None:  # noqa: ANN001
    llm = LLM(folder, max_num_batched_tokens=16)
    eng = llm.engine
    steps: list[list[tuple[str, int, bool]]] = []  # per step: (request id, tokens, prefill?)
    schedule = eng.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        steps.append([(r.request_id, n, r.is_prefill) for r, n in out.scheduled])
        return out

    monkeypatch.setattr(eng.scheduler, "schedule", recording_schedule)
    rng = random.Random(9)
    shorts = [eng.add_request(_ids(rng, 3), _greedy(6)) for _ in range(3)]
    eng.step()
    long_prompt = _ids(rng, 120)
    long = eng.add_request(long_prompt, _greedy(4), kv="full")
    finished: dict[str, RequestOutput] = {}
    later: list[str] = []
    for _ in range(200):
        later.append(eng.add_request(_ids(rng, 3), _greedy(6)))  # a new short request every step
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
        llm.pool.check_invariants()
        if long in finished:
            break
    assert long in finished, "the long prompt starved"
    assert sum(n for s in steps for rid, n, _ in s if rid == long) == 120 + 3  # its prompt once, then decodes
    assert all(sum(n for _, n, _ in s) <= 16 for s in steps)
    long_steps = [i for i, s in enumerate(steps) if any(rid == long and pre for rid, _, pre in s)]
    assert len(long_steps) >= 8  # 120 tokens in budgets of 16
    mixed = [s for s in steps if any(rid == long and pre for rid, _, pre in s)
             and any(rid != long and not pre for rid, _, pre in s)]
    assert mixed, "no step packed the long prompt's chunk with decode tokens"
    # FCFS: no request that arrived after the long prompt was scheduled before it
    first_long = long_steps[0]
    assert not any(rid in later for s in steps[: first_long + 1] for rid, _, _ in s)
    assert all(sid in finished for sid in shorts)
    _drain(llm)
    assert llm.pool.num_used_blocks == 0
    assert finished[long].token_ids == _alone(big, long_prompt, _greedy(4), "full")


# ---- batches --------------------------------------------------------------------------------------
MIXED = ["full", "snapkv:16", "streamingllm:24", "h2o:16", "full prefill=chunked(size=7)", "int8",
         "snapkv:16 int8", "snapkv:16 prefill=chunked(size=8)", "tova:20"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mixed_specs_in_one_batch_equal_each_alone(tiny_checkpoint, arch: str) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint(arch)[0])
    rng = random.Random(10)
    jobs = [(_ids(rng, rng.randrange(8, 60)), _greedy(10), spec) for spec in MIXED]
    expected = [_alone(llm, *job) for job in jobs]
    rids = [llm.engine.add_request(p, sp, kv=s) for p, sp, s in jobs]
    reports = _drain(llm)
    assert [_final(reports, rid).token_ids for rid in rids] == expected
    batched = llm.generate([p for p, _, _ in jobs], _greedy(10), kv=[s for _, _, s in jobs])
    assert [o.token_ids for o in batched] == expected
    assert llm.pool.num_used_blocks == 0 and _no_quant_blocks(llm)


@pytest.mark.parametrize("spec", ["full", "snapkv:32", "streamingllm:24"])
@pytest.mark.parametrize("blocks", [None, 80], ids=["roomy", "tight"])
def test_generate_with_a_shared_prefix_equals_separate_runs(folder, big: LLM, spec: str,  # noqa: ANN001
                                                            blocks: int | None) -> None:
    rng = random.Random(11)
    ctx = _ids(rng, 150)
    prompts = [ctx + _ids(rng, n) for n in (4, 20, 11, 1)]
    expected = [_alone(big, p, _greedy(12), spec) for p in prompts]
    llm = LLM(folder, max_kv_bytes=None if blocks is None else _pool_bytes(blocks))
    forked = []
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        forked.extend(out.forked)
        return out

    llm.engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    outs = llm.generate(prompts, _greedy(12), kv=spec)
    if blocks is None:
        assert len(forked) == len(prompts)  # every prompt continued from the one prefix
    else:  # the prefix and a copy do not fit together: the prefix is dropped, the prompts prefill alone
        assert len(forked) < len(prompts)
    assert [o.token_ids for o in outs] == expected
    assert llm.pool.num_used_blocks == 0 and llm.engine.requests == {}


def test_engine_from_llm_validates_its_bounds(folder) -> None:  # noqa: ANN001
    llm = LLM(folder)
    for kwargs in ({"max_num_batched_tokens": 0}, {"max_waiting": -1}, {"max_num_batched_tokens": True}):
        with pytest.raises(LongctxError, match="positive integer"):
            LLMEngine(llm, **kwargs)


@pytest.mark.parametrize("spec", ["snapkv:16", "h2o:16", "tova:20", "retain=snapkv budget=uniform(tokens=12,slack=4)",
                                  "snapkv:16 prefill=chunked(size=9)"])
def test_prompts_prefilled_together_evict_as_one_stack_and_equal_each_alone(tiny_checkpoint, spec: str,  # noqa: ANN001
                                                                            monkeypatch) -> None:  # noqa: ANN001
    from longctx.engine import context  # noqa: PLC0415

    llm = LLM(tiny_checkpoint("llama")[0])
    rng = random.Random(12)
    prompts = [_ids(rng, n) for n in (40, 23, 57, 31, 18)]
    expected = [_alone(llm, p, _greedy(8), spec) for p in prompts]
    stacks: list[int] = []
    real = context.evict_due

    def counting(due, rotary):  # noqa: ANN001, ANN202
        stacks.append(len(due))
        return real(due, rotary)

    monkeypatch.setattr(context, "evict_due", counting)
    outs = llm.generate(prompts, _greedy(8), kv=spec)
    assert [o.token_ids for o in outs] == expected
    assert max(stacks) >= 2, "no layer step evicted several prompts as one stack"
    assert llm.pool.num_used_blocks == 0
