"""KVzip (``retain=kvzip``): a covering budget equals the full cache; its scores are the max attention of the
reconstruction queries, computed independently with Hugging Face eager attention; the reconstruction leaves
nothing in the cache; a shared document is compressed once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.kv.registry import methods
from longctx.kv.retain import kvzip
from longctx.kv.retain.kvzip import REPEAT_FIRST, REPEAT_NEXT, RepeatPrompt, reconstruction_inputs
from longctx.kv.sequence import SequenceKV

ALLOCATORS = sorted(n for n, cls in methods("budget").items() if not getattr(cls, "unlimited", False)
                    and n in ("uniform", "pyramid", "adaptive"))


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    return LLM(tiny_checkpoint("llama")[0])


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records every scoring pass: the tokens it reconstructed and, per layer, each row's (positions, scores)
    right after it (before any eviction)."""
    records: list[dict[str, Any]] = []
    original = kvzip.score_tokens

    def score_tokens(model, seq, prompt, token_ids, num_tokens):  # noqa: ANN001, ANN202
        start = seq.reconstructed
        original(model, seq, prompt, token_ids, num_tokens)
        rows = []
        for layer in range(seq.cfg.num_layers):
            view = seq.rows.gather(layer)
            rows.append([(view.pos[h, : int(n)].tolist(), view.score[h, : int(n)].clone())
                         for h, n in enumerate(view.lengths)])
        records.append({"start": start, "end": num_tokens, "rows": rows})

    monkeypatch.setattr(kvzip, "score_tokens", score_tokens)
    return records


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    original = SequenceKV.snapshot

    def snapshot(self: SequenceKV, final: bool) -> None:
        positions = []
        for layer in range(self.cfg.num_layers):
            view = self.rows.gather(layer)
            positions.append([view.pos[h, : int(n)].tolist() for h, n in enumerate(view.lengths)])
        records.append({"final": final, "used_blocks": self.rows.pool.num_used_blocks, "positions": positions,
                        "reconstructed": self.reconstructed})
        original(self, final)

    monkeypatch.setattr(SequenceKV, "snapshot", snapshot)
    return records


# ---- full equals baseline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_covering_budget_equals_full_cache(arch: str, tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    model = LLM(tiny_checkpoint(arch)[0])
    prompt = _prompt(40)
    full_tokens = model.generate(prompt, greedy(6), kv="full")[0].token_ids
    full_logits = model.prompt_logits(prompt, "full")
    specs = [f"retain=kvzip({p}) budget={alloc}(tokens=10000) prefill={prefill}"
             for alloc in ALLOCATORS for prefill in ("dense", "chunked(size=16)")
             for p in ("chunk=16", "num_sinks=0")]
    assert len(ALLOCATORS) == 3
    outs = model.generate([prompt] * len(specs), greedy(6), kv=specs)
    for spec, out in zip(specs, outs, strict=True):
        assert out.token_ids == full_tokens, spec
        assert out.stats.kv.num_evictions == 0, spec
    for spec in specs[::3]:
        torch.testing.assert_close(model.prompt_logits(prompt, spec), full_logits, atol=1e-5, rtol=0, msg=spec)
    assert model.pool.num_used_blocks == 0


# ---- scores: the max attention of the reconstruction queries ----------------------------------------------


def test_repeat_prompt_is_the_papers(llm: LLM) -> None:
    tok = llm.tokenizer
    assert tok is not None
    prompt = RepeatPrompt.for_tokenizer(tok)
    assert tok.decode(prompt.first) == REPEAT_FIRST and tok.decode(prompt.next) == REPEAT_NEXT
    assert tok.decode(prompt.suffix, skip_special_tokens=False) == "<|im_end|>\n<|im_start|>assistant\n"
    ids = list(range(100, 140))
    chunks = reconstruction_inputs(prompt, lambda s, e: ids[s:e], 0, 40, 16)
    assert [(s, e) for s, e, _ in chunks] == [(0, 16), (16, 32), (32, 40)]
    assert chunks[0][2] == prompt.first + prompt.suffix + ids[:16]
    assert chunks[1][2] == prompt.next + ids[8:16] + prompt.suffix + ids[16:32]
    assert RepeatPrompt.for_tokenizer(None) == RepeatPrompt([], [], [])


def _hf_scores(hf: Any, context: list[int], ids: list[int], start: int, end: int, sinks: int) -> torch.Tensor:
    """[layers, kv_heads, end - start]: for each context token of [start, end), the largest attention any
    reconstruction query gives it (over the queries and the query heads of its group), the softmax
    restricted to sinks + [start, end) + the reconstruction tokens; from HF eager attention probabilities
    (restricting a softmax = renormalising its probabilities over the subset)."""
    n = len(context)
    with torch.no_grad():
        out = hf(torch.tensor([context + ids]), output_attentions=True)
    t = n + len(ids)
    keep = torch.zeros(t, dtype=torch.bool)
    keep[: min(sinks, n)] = True
    keep[start:end] = True
    keep[n:] = True
    scores = []
    for att in out.attentions:  # [1, heads, T, T]
        p = att[0, :, n:, :].double() * keep  # the reconstruction queries' rows
        p = p / p.sum(-1, keepdim=True)
        heads = p.shape[0]
        kv_heads = hf.config.num_key_value_heads
        p = p.view(kv_heads, heads // kv_heads, len(ids), t)
        scores.append(p.amax(dim=(1, 2))[:, start:end])
    return torch.stack(scores)


@pytest.mark.parametrize("chunk", [64, 16])
def test_scores_equal_max_attention_of_the_reconstruction(llm: LLM, tiny_checkpoint, passes: list[dict[str, Any]],
                                                          snapshots: list[dict[str, Any]], chunk: int) -> None:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    folder, _ = tiny_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    context, sinks, budget = _prompt(40, seed=1), 2, 12
    spec = f"retain=kvzip(num_sinks={sinks},chunk={chunk}) budget=uniform(tokens={budget})"
    llm.generate(context, greedy(1), kv=spec)
    assert len(passes) == 1 and (passes[0]["start"], passes[0]["end"]) == (0, 40)
    prompt = RepeatPrompt.for_tokenizer(llm.tokenizer)
    chunks = reconstruction_inputs(prompt, lambda s, e: context[s:e], 0, 40, chunk)
    assert len(chunks) == (1 if chunk == 64 else 3)
    expected = torch.cat([_hf_scores(hf, context, ids, s, e, sinks) for s, e, ids in chunks], dim=-1)
    rows = passes[0]["rows"]
    kept = [r for r in snapshots if not r["final"]][0]["positions"]
    for layer in range(llm.config.num_layers):
        for h in range(llm.config.num_kv_heads):
            pos, got = rows[layer][h]
            assert pos == list(range(40))  # scored before anything is evicted
            torch.testing.assert_close(got.double(), expected[layer, h], atol=1e-5, rtol=1e-4)
            # what stays: the sinks, then the highest importance
            rest = sorted(range(sinks, 40), key=lambda j: -float(expected[layer, h, j]))[: budget - sinks]
            assert kept[layer][h] == sorted(range(sinks)) + sorted(rest), (layer, h)


# ---- nothing of the reconstruction stays ---------------------------------------------------------------------


def test_reconstruction_leaves_no_tokens_and_no_blocks(llm: LLM, passes: list[dict[str, Any]],
                                                       snapshots: list[dict[str, Any]]) -> None:
    prompt, budget, new = _prompt(64, seed=2), 16, 10
    bs = llm.pool.block_size
    out = llm.generate(prompt, greedy(new), kv=f"retain=kvzip budget=uniform(tokens={budget})")[0]
    after_prefill, final = [r for r in snapshots if not r["final"]][0], [r for r in snapshots if r["final"]][0]
    rows = llm.config.num_layers * llm.config.num_kv_heads
    assert after_prefill["used_blocks"] == rows * -(-budget // bs)  # exactly the budget's blocks are held
    for layer in after_prefill["positions"]:
        for row in layer:
            assert len(row) == budget and set(row) <= set(range(64)) and row[:4] == [0, 1, 2, 3]
    fed = 64 + new - 1  # the last sampled token is never fed
    for layer in final["positions"]:
        for row in layer:
            assert len(row) == budget and set(row) <= set(range(fed)) and row == sorted(row)
    assert final["reconstructed"] == fed  # every decode-time compression reconstructed only the new tokens
    assert [(p["start"], p["end"]) for p in passes][0] == (0, 64)
    assert all(a["end"] == b["start"] for a, b in zip(passes, passes[1:], strict=False))
    assert out.stats.kv.final_tokens_per_row == [[budget] * 2] * 3
    assert out.stats.kv_bytes_peak <= rows * -(-(64 + 1) // bs) * llm.pool.bytes_per_block  # no extra room taken
    assert llm.pool.num_used_blocks == 0


def test_reconstruction_does_not_change_the_prompt_pass(llm: LLM) -> None:
    """The logits of the prompt (computed before the compression) equal the full cache's; only what follows
    the compression differs."""
    prompt = _prompt(48, seed=3)
    full = llm.prompt_logits(prompt, "full")
    torch.testing.assert_close(llm.prompt_logits(prompt, "kvzip:16"), full, atol=1e-5, rtol=0)
    a = llm.generate(prompt, greedy(5), kv="kvzip:16")[0]
    b = llm.generate(prompt, greedy(5), kv="kvzip:16")[0]
    assert a.token_ids == b.token_ids and a.stats.kv.num_evictions > 0


# ---- prefix sharing: compress the document once, then ask ---------------------------------------------------


def test_shared_document_is_compressed_once(llm: LLM, passes: list[dict[str, Any]]) -> None:
    g = torch.Generator().manual_seed(7)
    doc = torch.randint(0, 256, (200,), generator=g).tolist()
    prompts = [doc + torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 9)]
    spec = "retain=kvzip(chunk=64) budget=uniform(tokens=32)"
    shared = llm.generate(prompts, greedy(6), kv=spec, share_prefix=True)
    # the document: one pass over it (in chunks of 64) for all three questions
    assert sum(p["start"] == 0 for p in passes) == 1
    assert [(p["start"], p["end"]) for p in passes if p["start"] < 200] == [(0, 200)]
    # each question continues from the compressed document: the same as compressing at the document's end
    # within each prompt (a prefill chunk boundary there), then at the prompt's end
    passes.clear()
    alone = llm.generate(prompts, greedy(6), kv=f"{spec} prefill=chunked(size=200)", share_prefix=False)
    assert sum(p["start"] == 0 for p in passes) == 3
    assert [o.token_ids for o in shared] == [o.token_ids for o in alone]
    assert [o.stats.kv.final_tokens_per_row for o in shared] == [[[32, 32]] * 3] * 3
    assert all(o.stats.kv.num_evictions > 0 for o in shared)
    assert llm.pool.num_used_blocks == 0
