"""The SDPA fast path computes the same attention as the reference oracle."""

from __future__ import annotations

import pytest
import torch

from longctx.attention.reference import attend, causal_mask
from longctx.attention.sdpa import sdpa_attend
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams


@pytest.mark.parametrize("num_queries", [1, 7, 40])
@pytest.mark.parametrize("window", [None, 9])
def test_sdpa_matches_reference_on_ragged_rows(num_queries: int, window: int | None) -> None:
    torch.manual_seed(num_queries)
    heads, group, length, dim = 3, 2, 50, 16
    q = torch.randn(heads, group, num_queries, dim)
    k, v = torch.randn(heads, length, dim), torch.randn(heads, length, dim)
    lengths = torch.tensor([50, 31, 44])
    valid = torch.arange(length)[None] < lengths[:, None]
    k_pos = torch.sort(torch.randperm(200)[:length]).values.expand(heads, length).clone()
    q_pos = torch.arange(200, 200 + num_queries)
    mask = causal_mask(q_pos, k_pos, valid, window)
    ref, _ = attend(num_queries, lambda s, e: q[:, :, s:e] @ k[:, None].transpose(-1, -2),
                    lambda s, e: mask[:, s:e], v, dim**-0.5)
    fast = sdpa_attend(q, k, v, lambda: mask, dim**-0.5)
    assert (fast - ref).abs().max() < 1e-5


def test_sdpa_unmasked_causal_matches_reference() -> None:
    torch.manual_seed(0)
    heads, group, length, dim = 2, 3, 33, 8
    q, k, v = torch.randn(heads, group, length, dim), torch.randn(heads, length, dim), torch.randn(heads, length, dim)
    pos = torch.arange(length)
    mask = causal_mask(pos, pos.expand(heads, length), torch.ones(heads, length, dtype=torch.bool), None)
    ref, _ = attend(length, lambda s, e: q[:, :, s:e] @ k[:, None].transpose(-1, -2), lambda s, e: mask[:, s:e],
                    v, dim**-0.5)
    fast = sdpa_attend(q, k, v, lambda: mask, dim**-0.5, need_mask=False)
    assert (fast - ref).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_engine_on_reference_attention_matches_fast_path(arch, tiny_checkpoint, monkeypatch) -> None:  # noqa: ANN001
    folder, _ = tiny_checkpoint(arch)
    llm = LLM(folder)
    ids = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    fast_logits = llm.prompt_logits(ids, kv="snapkv:20")
    fast = llm.generate([ids], params, kv="snapkv:20")[0].token_ids
    monkeypatch.setenv("LONGCTX_ATTENTION", "reference")
    ref_logits = llm.prompt_logits(ids, kv="snapkv:20")
    ref = llm.generate([ids], params, kv="snapkv:20")[0].token_ids
    assert (fast_logits - ref_logits).abs().max() < 1e-4
    assert fast == ref


def test_sdpa_unmasked_chunk_after_cache_is_bottom_right_causal() -> None:
    torch.manual_seed(1)
    heads, group, length, chunk, dim = 2, 3, 40, 9, 8
    q = torch.randn(heads, group, chunk, dim)
    k, v = torch.randn(heads, length, dim), torch.randn(heads, length, dim)
    k_pos = torch.cat([torch.sort(torch.randperm(100)[: length - chunk]).values, torch.arange(100, 100 + chunk)])
    mask = causal_mask(torch.arange(100, 100 + chunk), k_pos.expand(heads, length),
                       torch.ones(heads, length, dtype=torch.bool), None)
    ref, _ = attend(chunk, lambda s, e: q[:, :, s:e] @ k[:, None].transpose(-1, -2), lambda s, e: mask[:, s:e],
                    v, dim**-0.5)
    fast = sdpa_attend(q, k, v, lambda: mask, dim**-0.5, need_mask=False)
    assert (fast - ref).abs().max() < 1e-5
