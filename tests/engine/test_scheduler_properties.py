"""A property test of the engine loop under churn: a small KV pool, a couple of hundred requests of mixed KV
specs and lengths arriving at random steps, random aborts, bounded queues and requests too large for the pool.

After every step the pool's invariants hold, no more blocks are used than it has, no step exceeds its token
budget or its sequence limit. At the end every request ended exactly once (finished, aborted, or refused at
submission with a clear error), none is lost, nothing is still held, and each one that finished produced
exactly the tokens it produces when run alone (greedy and seeded sampling)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from longctx import LLM, SamplingParams
from longctx.engine.request import RequestOutput
from longctx.errors import QueueFullError, RequestTooLargeError
from longctx.kv.spec import KVSpec

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BLOCK_BYTES = 2 * 16 * 16 * 4  # the tiny Llama: K and V, 16 tokens, head_dim 16, fp32
SPECS = ["full", "snapkv:16", "streamingllm:24", "h2o:16", "full prefill=chunked(size=7)", "int8",
         "snapkv:16 int8", "snapkv:12 prefill=chunked(size=8)", "tova:20"]


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    spec: str
    stream: bool
    outputs: list[RequestOutput] = field(default_factory=list)
    aborted: bool = False  # abort() returned True for it


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):  # noqa: ANN001, ANN201
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def reference(folder):  # noqa: ANN001, ANN201
    """Tokens of one job run alone in a roomy pool (memoized)."""
    llm = LLM(folder)
    cache: dict[tuple, list[int]] = {}

    def run(job: Job) -> list[int]:
        key = (tuple(job.prompt), repr(job.params), job.spec)
        if key not in cache:
            out = llm.generate(job.prompt, job.params, kv=job.spec)[0]
            assert out.stats.num_preemptions == 0
            cache[key] = out.token_ids
        return cache[key]

    return run


def _params(rng: random.Random) -> SamplingParams:
    # mostly short; some long enough that their rows grow by blocks while decoding (what forces preemptions,
    # since a growing request is admitted on its prompt)
    n = rng.randint(24, 48) if rng.random() < 0.15 else rng.randint(1, 8)
    if rng.random() < 0.3:
        return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, seed=rng.randrange(1 << 20),
                              ignore_eos=rng.random() < 0.5)
    return SamplingParams(max_tokens=n, ignore_eos=rng.random() < 0.5)


@pytest.mark.parametrize(("seed", "blocks", "budget", "max_seqs", "max_waiting"), [
    (0, 30, 12, 3, 12), (1, 45, 24, 6, None), (2, 70, 64, 16, 20), (3, 30, 64, 16, None), (4, 80, 16, 8, None)])
def test_random_arrivals_and_aborts_keep_the_pool_consistent(folder, reference, seed: int, blocks: int,  # noqa: ANN001
                                                             budget: int, max_seqs: int,
                                                             max_waiting: int | None) -> None:
    rng = random.Random(seed)
    llm = LLM(folder, max_kv_bytes=(blocks + 1) * BLOCK_BYTES, max_num_batched_tokens=budget,
              max_num_seqs=max_seqs, max_waiting=max_waiting)
    eng = llm.engine
    cap = eng.kv.capacity_blocks
    assert cap == blocks

    step_sizes: list[int] = []
    schedule = eng.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        out = schedule()
        step_sizes.append(sum(n for _, n in out.scheduled))
        assert len(eng.scheduler.running) <= max_seqs
        return out

    eng.scheduler.schedule = recording_schedule  # type: ignore[method-assign]

    jobs: dict[str, Job] = {}
    retry: list[list[tuple[str, Job]]] = []  # refused with a full queue: the client tries again later
    refused = {"too large": 0, "queue full": 0}
    total = 200
    submitted = 0
    steps = 0
    groups = 0

    def new_job(prompt: list[int], spec: str, stream: bool) -> tuple[str, Job]:
        nonlocal submitted
        submitted += 1
        return f"r{submitted - 1}", Job(prompt, _params(rng), spec, stream)

    while submitted < total or retry or eng.has_unfinished_requests():
        arrivals: list[list[tuple[str, Job]]] = []  # single requests, and groups added at once
        if retry and rng.random() < 0.5:
            arrivals.append(retry.pop(0))
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 5])):
            if submitted >= total:
                break
            if rng.random() < 0.03:  # questions about one context: a shared prefix
                ctx = [rng.randrange(3, 250) for _ in range(130)]
                spec = rng.choice(["full", "snapkv:16", "streamingllm:24"])
                arrivals.append([new_job(ctx + [rng.randrange(3, 250) for _ in range(rng.randint(1, 10))], spec,
                                         False) for _ in range(rng.randint(2, 3))])
                continue
            big = rng.random() < 0.04  # more than the whole pool holds under a full cache
            prompt = [rng.randrange(3, 250) for _ in range(rng.randint(230, 250) if big else rng.randint(1, 40))]
            arrivals.append([new_job(prompt, "full" if big else rng.choice(SPECS), rng.random() < 0.5)])
        for group in arrivals:
            try:
                if len(group) == 1:
                    rid, job = group[0]
                    got = eng.add_request(job.prompt, job.params, kv=job.spec, request_id=rid, stream=job.stream)
                    assert got == rid
                else:
                    eng.add_requests([eng.make_request(job.prompt, job.params, KVSpec.parse(job.spec),
                                                       request_id=rid) for rid, job in group], share_prefix=True)
                    groups += 1
            except RequestTooLargeError:
                # refused only if a request's tokens cannot fit every row of the pool (tiny Llama: 16-token blocks)
                rows = llm.config.num_layers * llm.config.num_kv_heads
                assert any(len(job.prompt) + job.params.max_tokens > (blocks // rows) * 16 for _, job in group)
                refused["too large"] += len(group)
                continue
            except QueueFullError:
                assert max_waiting is not None and eng.scheduler.num_queued + len(group) > max_waiting
                refused["queue full"] += len(group)
                retry.append(group)
                continue
            finally:
                llm.pool.check_invariants()
            for rid, job in group:
                assert rid in eng.requests
                jobs[rid] = job
        if jobs and rng.random() < 0.15:  # abort a random request: queued, prefilling, decoding or gone
            rid = rng.choice(list(jobs))
            live = rid in eng.requests
            assert eng.abort(rid) is live
            if live:
                jobs[rid].aborted = True
                assert rid in eng.requests  # forgotten only once reported
        if rng.random() < 0.02:
            assert eng.abort("nobody") is False
        for out in eng.step():
            assert out.request_id in jobs, f"an output for an unknown request {out.request_id}"
            job = jobs[out.request_id]
            assert not (job.outputs and job.outputs[-1].finished), f"{out.request_id} reported after finishing"
            assert job.stream or out.finished, "a non-streamed request reported before it finished"
            job.outputs.append(out)
        steps += 1
        assert steps < 5000, "the engine made no progress"
        llm.pool.check_invariants()
        for qp in llm.pool.quant_pools.values():
            qp.check_invariants()
        st = eng.stats()
        assert llm.pool.num_used_blocks <= cap and st.blocks_used <= st.blocks_total == cap
        assert st.running == len(eng.scheduler.running) and st.waiting == len(eng.scheduler.waiting)
        live_ids = set(eng.requests)
        for r in (*eng.scheduler.running, *eng.scheduler.waiting):  # each one once; prefixes are internal
            assert r.request_id in live_ids or (r.prefill_only and r.pending_children > 0)
        assert len(set(map(id, (*eng.scheduler.running, *eng.scheduler.waiting)))) == st.running + st.waiting

    assert all(n <= budget for n in step_sizes)
    assert llm.pool.num_used_blocks == 0 and all(qp.num_used_blocks == 0 for qp in llm.pool.quant_pools.values())
    assert eng.requests == {} and not eng.scheduler.running and not eng.scheduler.waiting
    assert len(jobs) + refused["too large"] == total
    reasons: dict[str, int] = defaultdict(int)
    for rid, job in jobs.items():
        finished = [o for o in job.outputs if o.finished]
        assert len(finished) == 1, f"{rid} ended {len(finished)} times"
        final = finished[0]
        reason = final.outputs[0].finish_reason
        reasons[reason] += 1
        if job.stream:
            assert [t for o in job.outputs for t in o.outputs[0].new_token_ids] == final.token_ids
        if job.aborted:
            assert reason == "abort"
            assert final.token_ids == reference(job)[: len(final.token_ids)]
            continue
        assert reason in ("length", "stop"), f"{rid}: {reason} {final.error}"
        assert final.error is None
        if reason == "length":
            assert len(final.token_ids) == job.params.max_tokens
        assert final.token_ids == reference(job), f"{rid} ({job.spec}) differs from its run alone"
    # the run exercised what it is meant to
    assert reasons["abort"] > 0 and reasons["length"] > 0
    assert refused["too large"] > 0 and (refused["queue full"] > 0) == (max_waiting is not None)
    assert eng.stats().preempted > 0
    assert groups > 0 or blocks < 60  # a shared-prefix group needs ~60 blocks
