"""Select methods inside the batched decode step: the same tokens and bytes read as the per-sequence path,
block summaries exact at every step, a budget covering the whole context equal to ``select=all`` for every
method x retain x quant, mixed methods in one batch, no leaked blocks."""

from __future__ import annotations

import pytest
import torch

from longctx.engine import fast_decode
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.kv.registry import methods
from longctx.kv.select.summaries import block_summaries_dense

# each select method with a budget that covers any row of these tests
COVERING = {
    "all": "all",
    "quest": "quest(tokens=100000,dense_layers=0)",
    "sparq": "sparq(tokens=100000)",
    "tokenselect": "tokenselect(tokens=100000)",
    "tidaldecode": "tidaldecode(tokens=100000)",
    "recycled": "recycled(tokens=100000)",
    "lsh_sampling": "lsh_sampling(window=100000)",  # exact where sinks + window cover every row
}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (50, 33, 61)]


def _run(llm: LLM, spec, fast: bool, max_tokens: int = 12):  # noqa: ANN001, ANN202
    llm.runner.fast_decode = fast
    out = llm.generate(_prompts(), SamplingParams(max_tokens=max_tokens, ignore_eos=True), kv=spec)
    assert llm.pool.num_used_blocks == 0
    return [o.token_ids for o in out], [(o.stats.kv.read_bytes, o.stats.kv.decode_steps) for o in out]


@pytest.mark.parametrize("spec", ["select=quest(tokens=32,dense_layers=0)", "select=quest(page=32,tokens=32)",
                                  "retain=snapkv budget=uniform(tokens=24,slack=8) select=quest(tokens=16)",
                                  "retain=h2o budget=uniform(tokens=30) select=quest(tokens=16,dense_layers=0)",
                                  "int8 select=quest(tokens=32,dense_layers=0)", "select=sparq(r=4,tokens=24)",
                                  "select=tokenselect(tokens=24)", "snapkv:40 select=tokenselect(tokens=24)",
                                  "select=tidaldecode(select_layers=0,tokens=24)",
                                  "select=recycled(stride=4,tokens=24)",
                                  "retain=snapkv budget=uniform(tokens=40,slack=8) select=recycled(stride=3,tokens=16)",
                                  "select=lsh_sampling(bits=4,tables=16,sinks=2,window=4,dense_every=0)"])
def test_batched_step_matches_per_sequence_path(spec, tiny_checkpoint, torch_one_thread, monkeypatch) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    used = []
    real = fast_decode.prepare_decode
    monkeypatch.setattr("longctx.engine.runner.prepare_decode", lambda *a, **k: used.append(1) or real(*a, **k))
    fast = _run(llm, spec, True)
    assert bool(used) == ("int8" not in spec and "h2o" not in spec)  # quantized rows select per sequence
    slow = _run(llm, spec, False)
    assert fast == slow
    full = _run(llm, "full", True)
    assert fast[0] != full[0], "the selection should change some tokens at these budgets"
    assert all(steps == 11 and 0 < read for read, steps in fast[1])


@pytest.mark.parametrize("retain", ["", "retain=snapkv budget=uniform(tokens=40,slack=8)"])
@pytest.mark.parametrize("quant", ["", "int8"])
@pytest.mark.parametrize("name", sorted(COVERING))
def test_covering_budget_equals_select_all(name, retain, quant, tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    if name not in methods("select"):
        pytest.fail(f"select={name} is listed here but not registered")
    if COVERING[name] is None:
        return
    llm = LLM(tiny_checkpoint("llama")[0])
    base = " ".join(x for x in (retain, quant) if x) or "full"
    ref = _run(llm, base, True)[0]
    spec = f"{base} select={COVERING[name]}"
    assert _run(llm, spec, True)[0] == ref
    assert _run(llm, spec, False)[0] == ref


def test_every_registered_method_is_covered_here() -> None:
    assert set(methods("select")) <= set(COVERING)


def test_block_summaries_are_exact_before_every_step(tiny_checkpoint, torch_one_thread, monkeypatch) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    real = fast_decode.prepare_decode
    checked = []

    def checking(seqs, positions, device):  # noqa: ANN001, ANN202
        meta = real(seqs, positions, device)
        pool = seqs[0].rows.pool
        for seq in seqs:
            rows = seq.rows
            for layer in range(rows.num_layers):
                for h, blocks in enumerate(rows.blocks[layer]):
                    n = rows.lengths[layer][h]
                    idx = torch.tensor(blocks[: -(-n // pool.block_size)])
                    counts = (n - torch.arange(len(idx)) * pool.block_size).clamp(0, pool.block_size)
                    assert torch.equal(pool.summary[idx], block_summaries_dense(pool.k[idx], counts))
        checked.append(len(seqs))
        return meta

    monkeypatch.setattr("longctx.engine.runner.prepare_decode", checking)
    _run(llm, "retain=snapkv budget=uniform(tokens=24,slack=8) select=quest(tokens=16)", True, max_tokens=20)
    assert len(checked) >= 19


def test_mixed_select_methods_in_one_batch(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    specs = ["select=quest(tokens=16,dense_layers=0)", "full", "select=quest(tokens=32,dense_layers=1)"]
    together = _run(llm, specs, True)
    alone = [_run(llm, s, True) for s in specs]
    assert together[0] == [a[0][i] for i, a in enumerate(alone)]
    assert together[1][1] == (0, 0)  # select=all counts no reads


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_select_on_models_with_sliding_windows_and_softcaps(arch, tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint(arch)[0])
    spec = "select=quest(tokens=32,dense_layers=0)"
    assert _run(llm, spec, True) == _run(llm, spec, False)
    assert _run(llm, "select=quest(tokens=100000)", True)[0] == _run(llm, "full", True)[0]


def test_block_summaries_count_in_bytes_held(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    """A method that ranks blocks holds each block's key min / max too: 2 x head_dim values per block more."""
    llm = LLM(tiny_checkpoint("llama")[0])
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    full = llm.generate(_prompts(), params, kv="full")
    quest = llm.generate(_prompts(), params, kv="select=quest(tokens=32,dense_layers=0)")
    sparq = llm.generate(_prompts(), params, kv="select=sparq(tokens=32)")
    pool = llm.pool
    ratio = (pool.bytes_per_block + 2 * pool.head_dim * pool.k.element_size()) / pool.bytes_per_block
    for f, q, s in zip(full, quest, sparq, strict=True):
        assert q.stats.kv_bytes_held == pytest.approx(f.stats.kv_bytes_held * ratio)
        assert s.stats.kv_bytes_held == f.stats.kv_bytes_held  # no summaries
