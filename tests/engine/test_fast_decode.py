"""The batched decode path (one paged attention call per layer for all sequences) gives the same tokens
and logits as the per-sequence reference path, with eviction, query windows and mixed specs."""

from __future__ import annotations

import pytest
import torch

from longctx.engine import fast_decode
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams

SPECS = ["full", "snapkv:24", "retain=snapkv budget=uniform(tokens=24,slack=8)", "streamingllm:20",
         "tova:24", "keynorm:24", "retain=corm budget=pyramid(tokens=24)", "retain=snapkv budget=adaptive(tokens=20)"]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (50, 33, 61)]


@pytest.mark.parametrize("spec", SPECS)
def test_fast_decode_matches_per_sequence_path(spec, tiny_checkpoint, torch_one_thread, monkeypatch) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    used = []
    real = fast_decode.prepare_decode

    def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
        used.append(1)
        return real(*a, **k)

    monkeypatch.setattr("longctx.engine.runner.prepare_decode", counting)
    fast = llm.generate(_prompts(), params, kv=spec)
    assert used, "the batched decode path was not taken"
    llm.runner.fast_decode = False
    slow = llm.generate(_prompts(), params, kv=spec)
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
    assert [o.stats.kv_bytes_held for o in fast] == [o.stats.kv_bytes_held for o in slow]
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("spec", ["snapkv:24", "retain=corm budget=pyramid(tokens=24)", "tova:24",
                                  "retain=snapkv budget=adaptive(tokens=20)", "streamingllm:20", "hashevict:24",
                                  "retain=snapkv budget=uniform(tokens=20,slack=3)"])
def test_decode_eviction_of_all_layers_and_sequences_at_once_matches_one_by_one(spec, tiny_checkpoint,  # noqa: ANN001
                                                                               torch_one_thread, monkeypatch) -> None:
    """After a batched decode step, the layers due for eviction of every sequence are scored, selected and
    compacted as one stack of rows (``decode_eviction.evict_stacked``); the result equals evicting each
    sequence alone (its layers stacked) and evicting one layer at a time."""
    from longctx.kv import decode_eviction  # noqa: PLC0415
    from longctx.kv.sequence import SequenceKV  # noqa: PLC0415

    llm = LLM(tiny_checkpoint("llama")[0])
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    groups: list[list[int]] = []
    real = decode_eviction.evict_stacked

    def counting(group, *a):  # noqa: ANN001, ANN002, ANN202
        groups.append([len(layers) for _, layers, _ in group])
        return real(group, *a)

    monkeypatch.setattr(decode_eviction, "evict_stacked", counting)
    together = llm.generate(_prompts(), params, kv=spec)
    assert any(len(g) > 1 for g in groups), "no decode step evicted several sequences at once"
    assert max(max(g) for g in groups) == llm.config.num_layers, "no decode step evicted all layers at once"
    monkeypatch.setattr(decode_eviction, "_group_key", lambda seq, rotary, newest, layers: (id(seq),))
    per_sequence = llm.generate(_prompts(), params, kv=spec)
    monkeypatch.setattr(SequenceKV, "_can_evict_stacked", lambda self, layers, rotaries: False)
    one_by_one = llm.generate(_prompts(), params, kv=spec)
    for other in (per_sequence, one_by_one):
        assert [o.token_ids for o in together] == [o.token_ids for o in other]
        assert [o.stats.kv.final_tokens_per_row for o in together] == [o.stats.kv.final_tokens_per_row for o in other]
        assert [o.stats.kv_bytes_held for o in together] == [o.stats.kv_bytes_held for o in other]
    assert llm.pool.num_used_blocks == 0


def test_fast_decode_mixed_specs_in_one_batch(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("qwen3")[0])
    specs = ["full", "snapkv:16", "streamingllm:16"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    fast = [o.token_ids for o in llm.generate(_prompts(), params, kv=specs)]
    llm.runner.fast_decode = False
    slow = [o.token_ids for o in llm.generate(_prompts(), params, kv=specs)]
    assert fast == slow


def test_fast_decode_is_skipped_where_it_does_not_apply(tiny_checkpoint) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("gemma3")[0])
    req = llm._make_request([1, 2, 3], SamplingParams(), llm_spec("full"), chat=False)
    assert fast_decode.can_fast_decode([req.kv], llm.config)  # sliding-window layers: the kernels take a window
    q = llm._make_request([1, 2, 3], SamplingParams(), llm_spec("int8"), chat=False)
    assert not fast_decode.can_fast_decode([q.kv], llm.config)  # ... but not the quantized-prefix kernel
    req.kv.release()
    q.kv.release()
    llm2 = LLM(tiny_checkpoint("llama")[0])
    for spec, ok in [("full", True), ("h2o:8", False), ("int8", False), ("positions=rerotate", False),
                     ("positions=self_extend(group=2,window=8)", False), ("snapkv:8", True)]:
        r = llm2._make_request([1, 2, 3], SamplingParams(), llm_spec(spec), chat=False)
        assert fast_decode.can_fast_decode([r.kv], llm2.config) is ok, spec
        r.kv.release()


def llm_spec(text: str):  # noqa: ANN201
    from longctx.kv.spec import KVSpec  # noqa: PLC0415

    return KVSpec.parse(text)


def test_vectorised_torch_paged_decode_equals_the_reference() -> None:
    from longctx.attention.triton.paged_decode import paged_decode_attention_ref  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    bsz, hkv, group, d, bs, nblocks = 3, 2, 4, 16, 8, 64
    k_pool, v_pool = torch.randn(nblocks, bs, d, generator=g), torch.randn(nblocks, bs, d, generator=g)
    tables = torch.randperm(nblocks, generator=g)[: bsz * hkv * 6].view(bsz, hkv, 6).to(torch.int32)
    lengths = torch.tensor([[48, 1], [0, 17], [33, 40]], dtype=torch.int32)
    q = torch.randn(bsz, hkv * group, d, generator=g)
    ours = fast_decode.paged_decode_torch(q, k_pool, v_pool, tables, lengths, d**-0.5)
    ref = paged_decode_attention_ref(q, k_pool, v_pool, tables, lengths, d**-0.5)
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["gemma3", "mistral", "qwen2"])
@pytest.mark.parametrize("spec", ["full", "snapkv:20", "streamingllm:16",
                                  "retain=snapkv budget=uniform(tokens=16,slack=8)"])
def test_fast_decode_with_sliding_windows_matches_per_sequence_path(arch, spec, tiny_checkpoint,  # noqa: ANN001
                                                                      torch_one_thread) -> None:  # noqa: ANN001
    """Sliding-window layers on the batched path (the kernel skips the tokens that fell out of the window; rows
    are trimmed after each step): same tokens, rows and bytes as the per-sequence path, well past the window."""
    llm = LLM(tiny_checkpoint(arch)[0])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    fast = llm.generate(_prompts(), params, kv=spec)
    llm.runner.fast_decode = False
    slow = llm.generate(_prompts(), params, kv=spec)
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
    assert [o.stats.kv.final_tokens_per_row for o in fast] == [o.stats.kv.final_tokens_per_row for o in slow]
    assert [o.stats.kv_bytes_held for o in fast] == [o.stats.kv_bytes_held for o in slow]
    assert llm.pool.num_used_blocks == 0
