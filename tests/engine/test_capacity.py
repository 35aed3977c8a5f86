"""Compression becomes capacity: in the same fixed KV pool, requests whose KV method keeps a fraction of the
tokens run many more at once (admission counts what each spec will hold, and frees a dense prompt's room as
soon as it is evicted down to the budget)."""

from __future__ import annotations

import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams


def _max_running(llm: LLM, spec: str, n: int = 24, prompt: int = 120, new: int = 40) -> tuple[int, int]:
    g = torch.Generator().manual_seed(0)
    eng = llm.engine
    for _ in range(n):
        eng.add_request(torch.randint(0, 256, (prompt,), generator=g).tolist(),
                        SamplingParams(max_tokens=new, ignore_eos=True), kv=spec, stream=False)
    most, done = 0, 0
    while eng.has_unfinished_requests():
        done += len(eng.step())
        most = max(most, eng.stats().running)
        llm.pool.check_invariants()
    assert done == n and llm.pool.num_used_blocks == 0
    return most, eng.stats().preempted


def test_compressed_requests_run_many_more_at_once(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    folder = tiny_checkpoint("llama")[0]
    probe = LLM(folder)
    rows = probe.config.num_layers * probe.config.num_kv_heads
    per_full = rows * -(-(120 + 40) // probe.pool.block_size)  # blocks one full request ends with
    pool_bytes = (3 * per_full + 1) * probe.pool.bytes_per_block  # room for three of them
    full, _ = _max_running(LLM(folder, max_kv_bytes=pool_bytes), "full")
    for spec in ("snapkv:16 prefill=chunked(size=32)", "retain=snapkv budget=uniform(tokens=16,slack=8)"):
        compressed, preempted = _max_running(LLM(folder, max_kv_bytes=pool_bytes), spec)
        assert compressed >= 3 * full, (spec, compressed, full)
        assert preempted == 0  # bounded specs commit their peak at admission and are never pushed out
    assert full <= 4


def test_long_full_prompts_do_not_preempt_each_other_while_prefilling(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    """A request that keeps everything is admitted when its whole prompt fits: admitted on its first chunk
    alone, many long prompts would start at once and push each other out over and over while prefilling."""
    folder = tiny_checkpoint("llama")[0]
    probe = LLM(folder)
    rows = probe.config.num_layers * probe.config.num_kv_heads
    llm = LLM(folder, max_kv_bytes=(3 * rows * 10 + 1) * probe.pool.bytes_per_block, max_num_batched_tokens=32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (120,), generator=g).tolist() for _ in range(16)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(len(o.token_ids) == 40 for o in outs)
    assert llm.engine.stats().preempted <= len(prompts) // 4  # was 45 when admission counted the first chunk
    assert llm.pool.num_used_blocks == 0
