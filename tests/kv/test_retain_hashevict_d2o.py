"""HashEvict and D2O: covering budgets equal the full cache; HashEvict's signatures and choice on hand-built keys;
D2O's weighted merge on a hand-built row and through the engine's compaction; both listed by ``longctx methods``.

Engine tests run on a tiny random Llama on CPU in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from longctx.cli import main
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.errors import SpecError
from longctx.kv.eviction import select_keep, select_keep_padded
from longctx.kv.pool import BlockPool
from longctx.kv.retain.base import KVView
from longctx.kv.retain.d2o import D2O
from longctx.kv.retain.hashevict import HashEvict, hamming, projection, signatures
from longctx.kv.sequence import SequenceKV
from longctx.kv.spec import KVSpec
from longctx.model.rope import Rotary

COVERING = 10_000


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder)


def _view(keys: Tensor, values: Tensor, queries: Tensor | None = None, key_mass: Tensor | None = None) -> KVView:
    h, n, _ = keys.shape
    return KVView(keys=keys, values=values, positions=torch.arange(n).expand(h, n), valid=torch.ones(h, n, dtype=bool),
                  key_mass=torch.zeros(h, n) if key_mass is None else key_mass,
                  window_attention=lambda: torch.zeros(0), layer=0, num_layers=1,
                  window_queries=None if queries is None else (lambda: queries))


# ---- full equals baseline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("retain", ["hashevict", "hashevict(bits=8,seed=5,sinks=0,recent=3)", "d2o",
                                    "d2o(num_sinks=0,recent=0.25,ema=1.0)"])
def test_covering_budget_reproduces_the_full_cache(llm: LLM, retain: str) -> None:
    prompt = _prompt(40)
    full = llm.generate(prompt, _greedy(6), kv="full")[0]
    full_logits = llm.prompt_logits(prompt, "full")
    specs = [f"retain={retain} budget={alloc}(tokens={COVERING}) prefill={prefill}"
             for alloc in ("uniform", "pyramid", "adaptive") for prefill in ("dense", "chunked(size=16)")]
    outs = llm.generate([prompt] * len(specs), _greedy(6), kv=specs)
    for spec, out in zip(specs, outs, strict=True):
        assert out.token_ids == full.token_ids, spec
        assert out.stats.kv.num_evictions == 0, spec
        torch.testing.assert_close(llm.prompt_logits(prompt, spec), full_logits, atol=1e-5, rtol=0, msg=spec)
    assert llm.pool.num_used_blocks == 0


# ---- HashEvict ------------------------------------------------------------------------------------------------


def test_hashevict_projection_and_signatures_are_deterministic_for_a_seed() -> None:
    a, b = projection(16, 8, seed=7), projection(16, 8, seed=7)
    assert torch.equal(a, b) and a.shape == (16, 8)
    assert torch.equal(a, torch.randn(16, 8, generator=torch.Generator().manual_seed(7)))  # a plain seeded Gaussian
    assert not torch.equal(a, projection(16, 8, seed=8))
    x = torch.randn(3, 5, 16)
    sig = signatures(x, a)
    assert sig.dtype == torch.bool and sig.shape == (3, 5, 8)
    assert torch.equal(sig, signatures(x.clone(), projection(16, 8, seed=7)))
    assert torch.equal(sig, (x @ a) >= 0)
    # scaling never changes a signature (it hashes directions); Hamming distance counts differing bits
    assert torch.equal(signatures(3.5 * x, a), sig)
    expected = (sig[0][:, None, :] != sig[1][None, :, :]).sum(-1).float()
    assert torch.equal(hamming(sig[0], sig[1]), expected)
    # the policy scores with that same matrix: two instances with one seed agree, another seed does not
    q = torch.randn(2, 2, 1, 16)
    view = _view(torch.randn(2, 9, 16), torch.randn(2, 9, 16), queries=q)
    assert torch.equal(HashEvict(bits=8, seed=7).score(view), HashEvict(bits=8, seed=7).score(view))
    assert not torch.equal(HashEvict(bits=8, seed=7).score(view), HashEvict(bits=8, seed=1).score(view))


def test_hashevict_evicts_the_key_most_dissimilar_to_the_query() -> None:
    g = torch.Generator().manual_seed(0)
    d, n = 32, 8
    q = torch.randn(d, generator=g)
    keys = q + 0.3 * torch.randn(n, d, generator=g)  # all close to the query ...
    keys[5] = -q  # ... except one, opposite: every bit of its signature differs from the query's
    view = _view(keys[None], torch.randn(1, n, d, generator=g), queries=q.view(1, 1, 1, d))
    policy = HashEvict(bits=32, seed=0, sinks=0, recent=0)
    scores = policy.score(view)
    assert float(scores[0, 5]) == -32.0 and int(scores[0].argmin()) == 5
    keep = select_keep(scores, [n], [n - 1], policy.sinks, [policy.recent_tokens(n - 1)])[0]
    assert keep.tolist() == [0, 1, 2, 3, 4, 6, 7]
    # sinks protect it
    guarded = HashEvict(bits=32, seed=0, sinks=6, recent=0)
    keep = select_keep(guarded.score(view), [n], [n - 1], guarded.sinks, [0])[0]
    assert 5 in keep.tolist()


def test_hashevict_hashes_the_query_rotated_like_the_stored_keys(llm: LLM) -> None:
    """Through SequenceKV (native positions store rotated keys): the query it hands the policy is the raw query
    rotated at its position, and the prompt's end cuts every row to the budget."""
    cfg = llm.config
    spec = KVSpec.parse("retain=hashevict(bits=16,sinks=2,recent=2) budget=uniform(tokens=8)")
    seq = SequenceKV(BlockPool(cfg.head_dim, block_size=4, num_blocks=64), cfg, spec, prompt_len=20)
    rotary = Rotary(cfg.rope_of(0), cfg.head_dim, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(20, cfg.num_heads, cfg.head_dim, generator=g)
    k = torch.randn(20, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(20, cfg.num_kv_heads, cfg.head_dim, generator=g)
    pos = torch.arange(20)
    seq.attend_layer(0, q, k, v, pos, rotary, is_prefill=True)
    assert seq.rows.lengths[0] == [8] * cfg.num_kv_heads
    rotate_at = seq._rotate_fn(rotary, 20)
    group = cfg.num_heads // cfg.num_kv_heads
    raw_last = q[-1:].view(1, cfg.num_kv_heads, group, cfg.head_dim).permute(1, 2, 0, 3)  # [H, G, 1, D]
    torch.testing.assert_close(seq.window_queries(0, rotate_at), rotate_at(raw_last, pos[-1:]))
    seq.release()


# ---- D2O ---------------------------------------------------------------------------------------------------------


def _d2o_row() -> tuple[Tensor, Tensor]:
    """One row of 6 tokens: kept 0, 2, 5; evicted 1 (near 0), 3 (near 2), 4 (far from every kept key)."""
    e = torch.eye(4)
    keys = torch.stack([e[0], e[0] + 0.1 * e[1], e[1], 2.0 * e[1] + 0.2 * e[2], -e[0] - e[1], e[3]])[None]
    values = torch.arange(24, dtype=torch.float32).view(1, 6, 4) * 0.5 - 3
    return keys, values


def test_d2o_merge_preserves_the_weighted_sum_of_merged_values() -> None:
    keys, values = _d2o_row()
    keep = torch.tensor([[0, 2, 5]])
    view = _view(keys, values)
    new_k, new_v, tau = D2O().merge(view, keep, [3], None)

    def cos(i: int, j: int) -> float:
        return float(torch.nn.functional.cosine_similarity(keys[0, i], keys[0, j], dim=0))

    u1, u3, u4 = cos(1, 0), cos(3, 2), max(cos(4, j) for j in (0, 2, 5))
    assert math.isclose(float(tau), (u1 + u3 + u4) / 3, rel_tol=1e-6)  # first cut: the mean similarity
    assert u1 >= float(tau) and u3 >= float(tau) > u4  # 1 and 3 merge, 4 is dropped
    for kept, absorbed, u in ((0, 1, u1), (2, 3, u3)):
        w = math.exp(u)
        for new, old in ((new_v, values), (new_k, keys)):
            # (e + exp(u)) * merged == e * kept + exp(u) * evicted: the weighted sum is preserved
            torch.testing.assert_close((math.e + w) * new[0, kept], math.e * old[0, kept] + w * old[0, absorbed])
    torch.testing.assert_close(new_v[0, 5], values[0, 5])  # absorbed nothing: unchanged
    torch.testing.assert_close(new_k[0, 5], keys[0, 5])
    # the next cut of the layer moves the threshold by an exponential moving average
    _, _, tau2 = D2O(ema=0.25).merge(view, keep, [3], torch.tensor(0.9))
    assert math.isclose(float(tau2), 0.75 * 0.9 + 0.25 * (u1 + u3 + u4) / 3, rel_tol=1e-6)


def test_d2o_merges_several_tokens_into_one_and_pads_are_ignored() -> None:
    keys, values = _d2o_row()
    keys = torch.cat([keys, keys])  # row 1 keeps only token 0 (count 1): 1 merges into it, padding is ignored
    values = torch.cat([values, 2 * values])
    keep, counts = torch.tensor([[0, 2, 5], [0, 6, 6]]), [3, 1]
    view = _view(keys, values)
    _, new_v, tau = D2O().merge(view, keep, counts, torch.tensor(0.5))
    assert 0.0 < float(tau) < 1.0
    sims = torch.nn.functional.cosine_similarity(keys[1, 1:], keys[1, :1], dim=-1)  # every other token vs token 0
    merged = [i + 1 for i, s in enumerate(sims.tolist()) if s >= float(tau)]
    assert merged  # at least token 1 is similar enough
    w = {i: math.exp(float(sims[i - 1])) for i in merged}
    expected = (math.e * values[1, 0] + sum(w[i] * values[1, i] for i in merged)) / (math.e + sum(w.values()))
    torch.testing.assert_close(new_v[1, 0], expected)
    torch.testing.assert_close(new_v[1, 1:], values[1, 1:])  # nothing else of the row is written


def test_d2o_engine_writes_merged_kv_into_the_kept_rows(llm: LLM) -> None:
    """Through SequenceKV: d2o keeps the tokens h2o-with-sinks keeps, in the same bytes, and their stored K/V
    are the merge of what the prompt wrote (computed here from the uncut rows)."""
    cfg = llm.config
    g = torch.Generator().manual_seed(2)
    n = 24
    q = torch.randn(n, cfg.num_heads, cfg.head_dim, generator=g)
    k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=g)
    pos = torch.arange(n)
    rotary = Rotary(cfg.rope_of(0), cfg.head_dim, cfg.max_position_embeddings)
    pool = BlockPool(cfg.head_dim, block_size=4, num_blocks=256)
    seqs = {}
    for name, text in (("full", f"retain=d2o budget=uniform(tokens={COVERING})"),
                       ("d2o", "retain=d2o(num_sinks=2,recent=0.25) budget=uniform(tokens=8)"),
                       ("h2o", "retain=h2o(recent=0.25) budget=uniform(tokens=8)")):
        seqs[name] = SequenceKV(pool, cfg, KVSpec.parse(text), prompt_len=n)
        seqs[name].attend_layer(0, q, k, v, pos, rotary, is_prefill=True)
    uncut, cut = seqs["full"].rows.gather(0), seqs["d2o"].rows.gather(0)
    assert seqs["d2o"].rows.lengths[0] == [8] * cfg.num_kv_heads
    assert seqs["d2o"].rows.bytes_held() == seqs["h2o"].rows.bytes_held()  # merged tokens cost what any token does
    recent = [int(8 * 0.25)] * cfg.num_kv_heads
    keep = select_keep(uncut.score, [n] * cfg.num_kv_heads, [8] * cfg.num_kv_heads, 2, recent)
    padded, counts = select_keep_padded(uncut.score, [n] * cfg.num_kv_heads, [8] * cfg.num_kv_heads, 2, recent)
    view = KVView(keys=uncut.k, values=uncut.v, positions=uncut.pos, valid=uncut.valid, key_mass=uncut.score,
                  window_attention=lambda: torch.zeros(0), layer=0, num_layers=cfg.num_layers)
    exp_k, exp_v, _ = D2O(num_sinks=2, recent=0.25).merge(view, padded, counts, None)
    changed = False
    for h, idx in enumerate(keep):
        assert cut.pos[h, :8].tolist() == uncut.pos[h, idx].tolist()
        torch.testing.assert_close(cut.k[h, :8], exp_k[h, idx])
        torch.testing.assert_close(cut.v[h, :8], exp_v[h, idx])
        changed |= not torch.equal(cut.v[h, :8], uncut.v[h, idx])
    assert changed  # some evicted token really was merged
    assert seqs["d2o"]._merge_state[0] is not None  # the layer's threshold is remembered for its next cut
    for s in seqs.values():
        s.release()
    assert pool.num_used_blocks == 0


def test_d2o_generates_within_budget_and_refuses_quantized_rows(llm: LLM) -> None:
    prompt = _prompt(64, seed=3)
    out = llm.generate(prompt, _greedy(8), kv="retain=d2o budget=uniform(tokens=16) prefill=chunked(size=16)")[0]
    assert out.stats.kv.prefill_tokens_per_row == [[16, 16]] * 3
    assert out.stats.kv.final_tokens_per_row == [[16, 16]] * 3
    assert out.stats.kv.num_evictions > 0 and len(out.token_ids) == 8
    with pytest.raises(SpecError, match="quant"):
        KVSpec.parse("d2o:16 int8")


# ---- listed ------------------------------------------------------------------------------------------------------


def test_methods_lists_hashevict_and_d2o(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, params in (("hashevict", ("bits=16", "seed=0", "sinks=4", "recent=1")),
                         ("d2o", ("num_sinks=4", "recent=0.5", "ema=0.5"))):
        assert f"  {name} " in out
        for p in params:
            assert p in out, (name, p)


def test_hashevict_signatures_count_in_bytes_held(llm: LLM) -> None:
    """``bits`` per cached token beside its K/V (the paper's stored signature), whole bytes per block."""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    prompt = list(range(1, 90))
    plain = llm.generate(prompt, params, kv="retain=snapkv budget=uniform(tokens=40)")[0].stats.kv_bytes_held
    hashed = llm.generate(prompt, params, kv="retain=hashevict(bits=12) budget=uniform(tokens=40)")[0]
    seq_blocks = plain // llm.pool.bytes_per_block
    assert hashed.stats.kv_bytes_held == seq_blocks * (llm.pool.bytes_per_block + -(-12 * llm.pool.block_size // 8))
