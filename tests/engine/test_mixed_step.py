"""A step mixing prompt chunks and decode tokens: the decode rows take the batched paged path while the
chunks attend through their sequences, with the same tokens and logits as the per-sequence path."""

from __future__ import annotations

import pytest
import torch

from longctx.engine import runner as runner_module
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams

SPECS = ["full", "snapkv:24", "streamingllm:20", "retain=snapkv budget=uniform(tokens=24,slack=8)",
         "full prefill=chunked(size=16)"]


def _staggered(llm: LLM, spec: str, logits: list[torch.Tensor] | None = None) -> list[list[int]]:
    """Requests added one step apart, so most steps hold one prompt chunk beside decoding rows."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 23, 57, 31)]
    eng = llm.engine
    ids, done = [], {}
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0)
    for p in prompts:
        ids.append(eng.add_request(p, params, kv=spec, stream=False))
        for out in eng.step():
            done[out.request_id] = out
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    if logits is not None:
        logits.extend(torch.tensor([next(iter(lp.values())) for lp in done[r].outputs[0].logprobs]) for r in ids)
    return [done[r].token_ids for r in ids]


@pytest.mark.parametrize("spec", SPECS)
def test_mixed_step_matches_per_sequence_path(spec, tiny_checkpoint, torch_one_thread, monkeypatch) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0], max_num_batched_tokens=32)
    mixed = []
    real = runner_module.ModelRunner._run_mixed

    def counting(self, scheduled, decode):  # noqa: ANN001, ANN202
        mixed.append((len(decode), len(scheduled) - len(decode)))
        return real(self, scheduled, decode)

    monkeypatch.setattr(runner_module.ModelRunner, "_run_mixed", counting)
    fast_lp: list[torch.Tensor] = []
    fast = _staggered(llm, spec, fast_lp)
    assert mixed and all(d >= 1 and p >= 1 for d, p in mixed), "no mixed step ran"
    llm.runner.fast_decode = False
    slow_lp: list[torch.Tensor] = []
    slow = _staggered(llm, spec, slow_lp)
    assert fast == slow
    for a, b in zip(fast_lp, slow_lp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert llm.pool.num_used_blocks == 0
