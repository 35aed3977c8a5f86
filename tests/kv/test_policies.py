"""Retain / budget / positions policies: each does what its definition says, and saves real memory.

One shared matrix, :data:`RETAIN_MATRIX`, lists every retain policy with parameter sets ordered easy to
hard; a new policy joins every engine property here with one line there (plus its definition check in
:data:`DEFINITIONS`). Engine tests run on a tiny random Llama on CPU in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from longctx.attention.reference import attend
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.kv.eviction import select_keep
from longctx.kv.pool import BlockPool
from longctx.kv.positions.rerotate import Rerotate
from longctx.kv.registry import lookup, methods
from longctx.kv.retain.base import KVView, RetainPolicy
from longctx.kv.sequence import SequenceKV, build
from longctx.kv.spec import KVSpec, make_method
from longctx.model.rope import Rotary

# ---- the matrix ------------------------------------------------------------------------------------

# (retain method, parameters), ordered easy to hard. A new retain policy joins with one line.
RETAIN_MATRIX: list[tuple[str, dict[str, Any]]] = [
    ("full", {}),
    ("streamingllm", {}),
    ("streamingllm", {"num_sinks": 0}),
    ("keynorm", {}),
    ("keynorm", {"num_sinks": 2, "recent": 3}),
    ("h2o", {}),
    ("h2o", {"recent": 0.0}),
    ("a2sf", {}),
    ("a2sf", {"forget": 1.0, "recent": 0.5}),
    ("tova", {}),
    ("tova", {"per_head": False}),
    ("corm", {"window": 4}),
    ("snapkv", {"window": 4, "kernel": 1}),
    ("snapkv", {"window": 4, "kernel": 3, "pooling": "avg"}),
    ("snapkv", {}),
    ("kvzip", {"chunk": 16}),
    ("kvzip", {"num_sinks": 0}),
    ("hashevict", {}),
    ("hashevict", {"bits": 8, "seed": 3, "sinks": 0, "recent": 2}),
    ("d2o", {}),
]
EVICTING = [(n, kw) for n, kw in RETAIN_MATRIX if n != "full"]
# budgets reading a head-score file (duo, razor, headkv) are covered by tests/kv/test_budget_heads.py
ALLOCATORS = sorted(n for n, cls in methods("budget").items()
                    if not getattr(cls, "unlimited", False) and not getattr(cls, "needs_head_scores", False))
COVERING = 10_000  # tokens: more than any context below


def _ids(matrix: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [_retain_text(n, kw) for n, kw in matrix]


def _retain_text(name: str, kwargs: dict[str, Any]) -> str:
    return str(make_method("retain", name, kwargs))


def _spec(name: str, kwargs: dict[str, Any], budget: str, positions: str = "native", prefill: str = "dense") -> str:
    return f"retain={_retain_text(name, kwargs)} budget={budget} positions={positions} prefill={prefill}"


def _policy(name: str, kwargs: dict[str, Any]) -> RetainPolicy:
    cls = lookup("retain", name)
    m = make_method("retain", name, kwargs)
    return cls(**dict(m.params))


def _prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


PROMPT = _prompt(40)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder)


@pytest.fixture(scope="module")
def baseline(llm: LLM) -> tuple[list[int], Tensor]:
    """Greedy tokens and prompt logits of the full cache on PROMPT."""
    tokens = llm.generate(PROMPT, greedy(6), kv="full")[0].token_ids
    return tokens, llm.prompt_logits(PROMPT, "full")


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records, at each KV snapshot (after prefill, at finish), the pool's used blocks and every row's positions."""
    records: list[dict[str, Any]] = []
    original = SequenceKV.snapshot

    def snapshot(self: SequenceKV, final: bool) -> None:
        positions = []
        for layer in range(self.cfg.num_layers):
            view = self.rows.gather(layer)
            positions.append([view.pos[h, : int(n)].tolist() for h, n in enumerate(view.lengths)])
        records.append({"final": final, "spec": str(self.spec), "used_blocks": self.rows.pool.num_used_blocks,
                        "positions": positions})
        original(self, final)

    monkeypatch.setattr(SequenceKV, "snapshot", snapshot)
    return records


def test_retain_matrix_covers_every_registered_retain_policy() -> None:
    assert {n for n, _ in RETAIN_MATRIX} == set(methods("retain"))
    assert set(DEFINITIONS) == {n for n, _ in EVICTING}
    assert ALLOCATORS == ["adaptive", "pyramid", "uniform"] or len(ALLOCATORS) >= 3


# ---- full equals baseline ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs"), RETAIN_MATRIX, ids=_ids(RETAIN_MATRIX))
def test_covering_budget_equals_full_cache(llm: LLM, baseline: tuple[list[int], Tensor], name: str,
                                           kwargs: dict[str, Any]) -> None:
    """Every allocator × positions native/rerotate × dense/chunked prefill, budget covering the context."""
    full_tokens, full_logits = baseline
    specs = [_spec(name, kwargs, f"{alloc}(tokens={COVERING})", positions, prefill)
             for alloc in ALLOCATORS for positions in ("native", "rerotate")
             for prefill in ("dense", "chunked(size=16)")]
    outs = llm.generate([PROMPT] * len(specs), greedy(len(full_tokens)), kv=specs)
    for spec, out in zip(specs, outs, strict=True):
        assert out.token_ids == full_tokens, spec
        assert out.stats.kv.num_evictions == 0, f"{spec}: evicted under a covering budget"
    for spec in specs:
        torch.testing.assert_close(llm.prompt_logits(PROMPT, spec), full_logits, atol=1e-5, rtol=0, msg=spec)
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("chunk", [16, 7])
def test_chunked_prefill_of_full_cache_reproduces_dense(llm: LLM, chunk: int) -> None:
    prompt = _prompt(100, seed=1)
    dense = llm.generate(prompt, greedy(8), kv="full")[0]
    chunked = llm.generate(prompt, greedy(8), kv=f"prefill=chunked(size={chunk})")[0]
    assert chunked.token_ids == dense.token_ids
    torch.testing.assert_close(llm.prompt_logits(prompt, f"prefill=chunked(size={chunk})"),
                               llm.prompt_logits(prompt, "full"), atol=1e-5, rtol=0)


# ---- each policy keeps what its definition says (hand-built inputs) -----------------------------------

H, G, L, D = 2, 2, 20, 8
LENGTHS = [20, 17]  # row 1 is padded
BUDGET = 10


def _hand_view(window: int, seed: int = 0) -> tuple[KVView, Tensor]:
    """A KVView of 2 rows (lengths 20 and 17) with random keys of varied norms, gapped positions,
    random accumulated key mass and random window attention; returns (view, window probabilities)."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]
    keys = torch.randn(H, L, D, generator=g) * torch.rand(H, L, 1, generator=g).mul(3).add(0.1)
    positions = torch.stack([torch.sort(torch.randperm(64, generator=g)[:L]).values for _ in range(H)])
    positions = positions.masked_fill(~valid, 0)
    key_mass = torch.rand(H, L, generator=g).masked_fill(~valid, 0.0)
    logits = torch.randn(H, G, max(window, 1), L, generator=g) * 2
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None], float("-inf")), dim=-1)
    queries = torch.randn(H, G, max(window, 1), D, generator=torch.Generator().manual_seed(seed + 100))
    view = KVView(keys=keys, values=torch.randn(H, L, D, generator=g), positions=positions, valid=valid,
                  key_mass=key_mass, window_attention=lambda: probs, layer=1, num_layers=3,
                  window_queries=lambda: queries)
    return view, probs


def _engine_keep(policy: RetainPolicy, view: KVView, budget: int) -> list[set[int]]:
    """What the engine keeps: the policy's scores (padding masked) through select_keep."""
    scores = policy.score(view).masked_fill(~view.valid, float("-inf"))
    keep = select_keep(scores, LENGTHS, [budget] * H, policy.sinks, [policy.recent_tokens(budget)] * H)
    for h, idx in enumerate(keep):
        assert idx.tolist() == sorted(idx.tolist()), "kept indices must be in row (= position) order"
        assert len(idx) == min(budget, LENGTHS[h])
    return [set(idx.tolist()) for idx in keep]


def _forced_plus_top(n: int, budget: int, forced: set[int], score: list[float]) -> set[int]:
    rest = sorted((i for i in range(n) if i not in forced), key=lambda i: -score[i])
    return forced | set(rest[: budget - len(forced)])


def _recent(n: int, count: int) -> set[int]:
    return set(range(n - count, n))


def _def_streamingllm(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n, s = LENGTHS[h], p.num_sinks
    return set(range(s)) | _recent(n, b - s)  # sinks + most recent, nothing else


def _def_keynorm(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n = LENGTHS[h]
    norms = [float(view.keys[h, i].norm()) for i in range(n)]
    return _forced_plus_top(n, b, set(range(p.num_sinks)) | _recent(n, p.recent), [-x for x in norms])


def _def_h2o(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n = LENGTHS[h]
    return _forced_plus_top(n, b, _recent(n, int(b * p.recent)), view.key_mass[h].tolist())


def _def_tova(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    last = probs[:, :, -1]  # [H, G, L]: the latest query's attention
    score = last[h].mean(0) if p.per_head else last.mean(dim=(0, 1))
    return _forced_plus_top(LENGTHS[h], b, set(), score.tolist())


def _def_corm(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n = LENGTHS[h]
    score = [max(float(probs[h, g, w, i]) for g in range(G) for w in range(p.window)) for i in range(L)]
    return _forced_plus_top(n, b, _recent(n, min(p.window, b)), score)


def _def_snapkv(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n, r = LENGTHS[h], p.kernel // 2
    mass = [sum(float(probs[h, g, w, i]) for g in range(G) for w in range(p.window)) for i in range(L)]
    around = [[mass[j] for j in range(max(0, i - r), min(L, i + r + 1))] for i in range(L)]
    pooled = [max(a) if p.pooling == "max" else sum(a) / p.kernel for a in around]  # avg counts padding
    return _forced_plus_top(n, b, _recent(n, min(p.window, b)), pooled)


def _def_hashevict(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n = LENGTHS[h]
    proj = torch.randn(D, p.bits, generator=torch.Generator().manual_seed(p.seed))  # the seeded Gaussian matrix
    key_bits = [[float(view.keys[h, i] @ proj[:, j]) >= 0 for j in range(p.bits)] for i in range(L)]
    q = view.window_queries()[h, :, -1]  # the latest query of each head of the group
    q_bits = [[float(q[g] @ proj[:, j]) >= 0 for j in range(p.bits)] for g in range(G)]
    dist = [sum(sum(a != c for a, c in zip(key_bits[i], q_bits[g], strict=True)) for g in range(G)) / G
            for i in range(L)]
    forced = set(range(min(p.sinks, b)))
    forced |= _recent(n, min(p.recent, b - len(forced)))
    return _forced_plus_top(n, b, forced, [-x for x in dist])  # the farthest from the query go first


def _def_d2o(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n = LENGTHS[h]
    forced = set(range(min(p.num_sinks, b)))
    forced |= _recent(n, min(int(b * p.recent), b - len(forced)))
    return _forced_plus_top(n, b, forced, view.key_mass[h].tolist())  # what is kept; merging is tested elsewhere


def _def_kvzip(p: Any, view: KVView, probs: Tensor, b: int, h: int) -> set[int]:
    n = LENGTHS[h]  # the importance its reconstruction pass wrote into the score slots (tests/kv/test_retain_kvzip.py)
    return _forced_plus_top(n, b, set(range(min(p.num_sinks, b))), view.key_mass[h].tolist())


DEFINITIONS: dict[str, Callable[..., set[int]]] = {
    "streamingllm": _def_streamingllm,
    "keynorm": _def_keynorm,
    "h2o": _def_h2o,
    "a2sf": _def_h2o,  # same selection rule on its (decayed) key mass; the decay is tested through the engine
    "tova": _def_tova,
    "corm": _def_corm,
    "snapkv": _def_snapkv,
    "kvzip": _def_kvzip,
    "hashevict": _def_hashevict,
    "d2o": _def_d2o,
}


@pytest.mark.parametrize("budget", [BUDGET, 6])
@pytest.mark.parametrize(("name", "kwargs"), EVICTING, ids=_ids(EVICTING))
def test_policy_keeps_what_its_definition_says(name: str, kwargs: dict[str, Any], budget: int) -> None:
    policy = _policy(name, kwargs)
    assert policy.evicts
    for seed in range(3):
        view, probs = _hand_view(policy.window_size(), seed)
        kept = _engine_keep(policy, view, budget)
        for h in range(H):
            assert kept[h] == DEFINITIONS[name](policy, view, probs, budget, h), f"{name} row {h} seed {seed}"


def test_full_policy_never_evicts() -> None:
    assert not _policy("full", {}).evicts


def test_select_keep_keeps_short_rows_whole_and_sinks_before_recent() -> None:
    scores = torch.rand(2, 10)
    keep = select_keep(scores, [10, 4], [6, 6], sinks=4, recent=[5, 5])
    assert keep[1].tolist() == [0, 1, 2, 3]  # shorter than its budget: untouched
    assert keep[0].tolist() == [0, 1, 2, 3, 8, 9]  # sinks first, recent gets what is left
    keep = select_keep(scores, [10, 10], [3, 0], sinks=4, recent=[5, 5])
    assert keep[0].tolist() == [0, 1, 2] and keep[1].tolist() == []


# ---- A2SF: forgetting factor -----------------------------------------------------------------------------


def _hand_rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """x [T, heads, D] rotated at pos [T] (HF rotate-half layout), written out independently."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_a2sf_key_mass_is_forget_weighted_attention_sum(llm: LLM) -> None:
    """Through SequenceKV: score_j = sum_i forget^(t - i) * attention(i -> j), summed over the group."""
    cfg, forget = llm.config, 0.7
    assert cfg.rope.rope_type == "default"
    spec = KVSpec.parse(f"retain=a2sf(forget={forget},recent=0.5) budget=uniform(tokens={COVERING})")
    seq = SequenceKV(BlockPool(cfg.head_dim, block_size=4, num_blocks=64), cfg, spec, prompt_len=10)
    rotary = Rotary(cfg.rope_of(0), cfg.head_dim, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(3)
    total, group = 14, cfg.num_heads // cfg.num_kv_heads
    q = torch.randn(total, cfg.num_heads, cfg.head_dim, generator=g)
    k = torch.randn(total, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(total, cfg.num_kv_heads, cfg.head_dim, generator=g)
    pos = torch.arange(total)
    # reference attention probabilities [heads, T, T] in float64
    qr, kr = _hand_rope(q, pos, cfg.rope.theta), _hand_rope(k, pos, cfg.rope.theta)
    kr = kr.repeat_interleave(group, dim=1)
    logits = torch.einsum("ihd,jhd->hij", qr, kr) * cfg.scale
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    probs = probs.view(cfg.num_kv_heads, group, total, total).sum(1)  # [kv_heads, T(query), T(key)]
    for start, end in [(0, 9), (9, 10), (10, 11), (11, 14)]:  # prefill, two decode steps, a 3-token chunk
        seq.attend_layer(0, q[start:end], k[start:end], v[start:end], pos[start:end], rotary,
                         is_prefill=start == 0)
        weights = forget ** torch.arange(end - 1, -1, -1, dtype=torch.float64)  # query i weighs forget^(t-i)
        expected = torch.einsum("i,hij->hj", weights, probs[:, :end, :end])
        got = seq.rows.gather(0).score[:, :end]
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=f"after {end} tokens")
    seq.release()


def test_attend_query_weights_apply_per_query_across_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 11, 11, generator=g)
    v = torch.randn(2, 11, 4, generator=g)
    mask = torch.ones(2, 11, 11, dtype=torch.bool).tril()
    w = 0.8 ** torch.arange(10, -1, -1, dtype=torch.float32)
    args = (11, lambda s, e: logits[:, :, s:e], lambda s, e: mask[:, s:e], v, 0.5)
    out_a, mass_a = attend(*args, want_key_mass=True, query_weights=w, chunk=3)
    out_b, mass_b = attend(*args, want_key_mass=True, query_weights=w, chunk=512)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(mass_a, mass_b)
    p = torch.softmax((logits * 0.5).masked_fill(~mask[:, None], float("-inf")), -1)
    torch.testing.assert_close(mass_b, torch.einsum("i,hgij->hj", w, p))


def test_a2sf_with_forget_one_equals_h2o_exactly(llm: LLM) -> None:
    prompt = _prompt(64, seed=2)
    chunked = "prefill=chunked(size=16)"  # so prompt logits see eviction between chunks
    a2sf = f"retain=a2sf(forget=1.0,recent=0.25) budget=uniform(tokens=16) {chunked}"
    h2o = f"retain=h2o(recent=0.25) budget=uniform(tokens=16) {chunked}"
    out_a, out_h = llm.generate([prompt, prompt], greedy(12), kv=[a2sf, h2o])
    assert out_a.token_ids == out_h.token_ids
    assert out_a.stats.kv.num_evictions == out_h.stats.kv.num_evictions > 0
    assert torch.equal(llm.prompt_logits(prompt, a2sf), llm.prompt_logits(prompt, h2o))
    decayed = llm.prompt_logits(prompt, f"retain=a2sf(forget=0.5,recent=0.25) budget=uniform(tokens=16) {chunked}")
    assert not torch.equal(decayed, llm.prompt_logits(prompt, h2o))  # the factor is really applied


# ---- real memory savings ----------------------------------------------------------------------------------


def _blocks(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size)


def test_every_evicting_policy_really_shrinks_rows_to_the_budget(llm: LLM) -> None:
    prompt = _prompt(64, seed=4)
    specs = ["full"] + [_spec(n, kw, "uniform(tokens=16)") for n, kw in EVICTING]
    outs = llm.generate([prompt] * len(specs), greedy(4), kv=specs)
    full = outs[0].stats
    assert full.kv.prefill_tokens_per_row == [[64] * 2] * 3
    for spec, out in zip(specs[1:], outs[1:], strict=True):
        kv = out.stats.kv
        assert kv.prefill_tokens_per_row == [[16, 16]] * 3, spec
        assert kv.final_tokens_per_row == [[16, 16]] * 3, spec  # decode stays within the budget
        assert out.stats.kv_bytes_after_prefill < full.kv_bytes_after_prefill, spec
        bits = build("retain", KVSpec.parse(spec).retain).stored_bits_per_token  # e.g. HashEvict's signatures
        per_block = llm.pool.bytes_per_block + -(-bits * llm.pool.block_size // 8)
        assert out.stats.kv_bytes_after_prefill == 6 * _blocks(16, llm.pool.block_size) * per_block, spec


def test_snapkv_budget_frees_pool_blocks(llm: LLM, snapshots: list[dict[str, Any]]) -> None:
    prompt = _prompt(64, seed=4)
    full = llm.generate(prompt, greedy(2), kv="full")[0]
    snap = llm.generate(prompt, greedy(2), kv="snapkv:16")[0]
    used_full, used_snap = (r["used_blocks"] for r in snapshots if not r["final"])
    bs = llm.pool.block_size
    assert used_full == 6 * _blocks(64, bs) and used_snap == 6 * _blocks(16, bs)
    assert snap.stats.kv.prefill_tokens_per_row == [[16, 16]] * 3
    assert snap.stats.kv_bytes_after_prefill == used_snap * llm.pool.bytes_per_block
    assert snap.stats.kv_bytes_after_prefill < full.stats.kv_bytes_after_prefill
    assert llm.pool.num_used_blocks == 0


def test_sliding_layers_keep_at_most_their_window(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    folder, _ = tiny_checkpoint("qwen2_sliding")
    sliding = LLM(folder)
    cfg = sliding.config
    window = cfg.sliding_window
    assert window is not None and any(cfg.is_sliding(i) for i in range(cfg.num_layers))
    prompt = _prompt(64, seed=5)
    outs = sliding.generate([prompt] * 2, greedy(3), kv=["snapkv:16", "snapkv:32"])
    for budget, out in zip((16, 32), outs, strict=True):
        expected = [[min(budget, window) if cfg.is_sliding(i) else budget] * cfg.num_kv_heads
                    for i in range(cfg.num_layers)]
        assert out.stats.kv.prefill_tokens_per_row == expected, budget


def test_adaptive_budget_gives_heads_different_lengths_and_frees_blocks(
        llm: LLM, snapshots: list[dict[str, Any]]) -> None:
    prompt = _prompt(64, seed=4)
    llm.generate(prompt, greedy(2), kv="full")
    out = llm.generate(prompt, greedy(2), kv="retain=snapkv budget=adaptive(tokens=16)")[0]
    rows = out.stats.kv.prefill_tokens_per_row
    assert any(len(set(layer)) > 1 for layer in rows), rows
    assert all(sum(layer) <= 16 * len(layer) for layer in rows), rows  # the layer's total budget holds
    used_full, used_adaptive = (r["used_blocks"] for r in snapshots if not r["final"])
    bs = llm.pool.block_size
    assert used_adaptive == sum(_blocks(n, bs) for layer in rows for n in layer) < used_full
    assert out.stats.kv_bytes_after_prefill == used_adaptive * llm.pool.bytes_per_block


def test_pyramid_budget_gives_decreasing_layer_lengths(llm: LLM) -> None:
    out = llm.generate(_prompt(64, seed=4), greedy(2), kv="retain=snapkv budget=pyramid(tokens=16)")[0]
    rows = out.stats.kv.prefill_tokens_per_row
    per_layer = [layer[0] for layer in rows]
    assert all(len(set(layer)) == 1 for layer in rows)
    assert all(a > b for a, b in zip(per_layer, per_layer[1:], strict=False)), per_layer
    assert out.stats.kv.budget_tokens == per_layer


def test_chunked_prefill_peak_is_budget_plus_chunk(llm: LLM) -> None:
    prompt = _prompt(200, seed=6)
    budget, chunk = 32, 16
    cfg, pool = llm.config, llm.pool
    chunked, dense = llm.generate(
        [prompt, prompt], greedy(4),
        kv=[f"retain=snapkv(window=8) budget=uniform(tokens={budget}) prefill=chunked(size={chunk})",
            f"retain=snapkv(window=8) budget=uniform(tokens={budget})"])
    rows = cfg.num_layers * cfg.num_kv_heads
    bound = rows * _blocks(budget + chunk, pool.block_size) * pool.bytes_per_block
    assert chunked.stats.kv_bytes_peak <= bound
    assert dense.stats.kv_bytes_peak > bound  # dense holds the whole prompt before evicting
    assert chunked.stats.kv.prefill_tokens_per_row == [[budget] * cfg.num_kv_heads] * cfg.num_layers


# ---- positions ---------------------------------------------------------------------------------------------


def test_rerotate_logits_equal_rope_recomputed_at_contiguous_positions() -> None:
    theta, d, tq = 10000.0, 8, 3
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([9, 6])
    keys = torch.randn(2, 9, d, generator=g)  # raw (un-rotated) keys as stored
    k_pos = torch.tensor([[0, 1, 2, 3, 20, 31, 32, 40, 41], [0, 1, 30, 39, 40, 41, 0, 0, 0]])  # after eviction
    q = torch.randn(2, 2, tq, d, generator=g)  # [H, G, Tq, D]
    q_pos = torch.tensor([39, 40, 41])  # original positions of the last three tokens

    def rotate_fn(x: Tensor, p: Tensor) -> Tensor:  # RotateFn over [..., n, D] with positions [..., n]
        flat_x, flat_p = x.reshape(-1, d), p.expand(x.shape[:-1]).reshape(-1)
        return _hand_rope(flat_x[:, None], flat_p, theta)[:, 0].to(x.dtype).view_as(x)

    got = Rerotate().logits(q, q_pos, keys, k_pos, lengths, rotate_fn)
    for h in range(2):
        n = int(lengths[h])
        k_new = _hand_rope(keys[h, :n, None], torch.arange(n), theta)[:, 0]  # kept keys at 0..n-1
        for grp in range(2):
            q_new = _hand_rope(q[h, grp, :, None], torch.arange(n - tq, n), theta)[:, 0]  # queries at n-3..n-1
            torch.testing.assert_close(got[h, grp, :, :n].double(), q_new @ k_new.T, atol=1e-5, rtol=1e-5)


def test_rerotate_without_eviction_equals_native(llm: LLM, baseline: tuple[list[int], Tensor]) -> None:
    tokens, logits = baseline
    assert llm.generate(PROMPT, greedy(len(tokens)), kv="rerotate")[0].token_ids == tokens
    torch.testing.assert_close(llm.prompt_logits(PROMPT, "rerotate"), logits, atol=1e-5, rtol=0)


def test_rerotate_after_eviction_changes_positions_not_content(llm: LLM) -> None:
    prompt = _prompt(64, seed=8)
    native = llm.prompt_logits(prompt, "streamingllm:16 prefill=chunked(size=16)")
    rerot = llm.prompt_logits(prompt, "streamingllm:16 prefill=chunked(size=16) rerotate")
    torch.testing.assert_close(rerot[:32], native[:32], atol=1e-5, rtol=0)  # nothing evicted before the 3rd chunk
    assert not torch.allclose(rerot[32:], native[32:], atol=1e-4)  # then positions differ


@pytest.mark.parametrize("positions", [
    "self_extend(group=1,window=8)",
    f"self_extend(group=4,window={COVERING})",
    f"lm_infinite(sinks=4,window={COVERING},max_distance={COVERING})",
    "yarn(factor=1.0)",
    "ntk(factor=1.0)",
    "linear(factor=1.0)",
])
def test_positions_method_reducing_to_native_equals_native(llm: LLM, baseline: tuple[list[int], Tensor],
                                                            positions: str) -> None:
    tokens, logits = baseline
    spec = f"positions={positions}"
    assert llm.generate(PROMPT, greedy(len(tokens)), kv=spec)[0].token_ids == tokens
    got = llm.prompt_logits(PROMPT, spec)
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)
    if positions.startswith("linear"):
        assert torch.equal(got, logits)


def test_self_extend_and_lm_infinite_change_logits_when_active(llm: LLM, baseline: tuple[list[int], Tensor]) -> None:
    _, logits = baseline
    for spec in ("positions=self_extend(group=4,window=8)", "positions=lm_infinite(sinks=2,window=8,max_distance=8)",
                 "positions=linear(factor=2.0)"):
        got = llm.prompt_logits(PROMPT, spec)
        if "linear" not in spec:  # queries within the window see exact positions
            torch.testing.assert_close(got[:8], logits[:8], atol=1e-5, rtol=0)
        assert not torch.allclose(got, logits, atol=1e-4), spec


# ---- decoding eviction and mixed batches --------------------------------------------------------------------


def test_streamingllm_decoding_keeps_sinks_and_last_tokens(llm: LLM, snapshots: list[dict[str, Any]]) -> None:
    prompt = _prompt(30, seed=9)
    out = llm.generate(prompt, greedy(60), kv="retain=streamingllm(num_sinks=4) budget=uniform(tokens=24)")[0]
    assert len(out.token_ids) == 60
    last = len(prompt) + 60 - 2  # the last sampled token is never fed back, so the cache ends one before it
    expected = [0, 1, 2, 3] + list(range(last - 19, last + 1))
    final = [r for r in snapshots if r["final"]]
    assert len(final) == 1
    for layer in final[0]["positions"]:
        for row in layer:
            assert row == expected
    assert out.stats.kv.final_tokens_per_row == [[24, 24]] * 3


def test_per_request_specs_in_one_batch_do_not_interfere(llm: LLM) -> None:
    p1, p2 = _prompt(40, seed=10), _prompt(50, seed=11)
    alone_full = llm.generate(p1, greedy(10), kv="full")[0]
    alone_stream = llm.generate(p2, greedy(10), kv="streamingllm:16")[0]
    both = llm.generate([p1, p2], greedy(10), kv=["full", "streamingllm:16"])
    assert both[0].token_ids == alone_full.token_ids
    assert both[1].token_ids == alone_stream.token_ids
    assert both[0].kv_spec == "retain=full" and both[1].stats.kv.final_tokens_per_row == [[16, 16]] * 3
    assert llm.pool.num_used_blocks == 0


def test_remembered_window_queries_are_the_last_w_across_prefill_decode_and_a_later_chunk(llm: LLM) -> None:
    """The window store (one tensor for every layer once decoding) holds exactly the last W raw queries of each
    layer, oldest first, through a prompt chunk, decode steps folded a few at a time, and a chunk after them."""
    cfg = llm.config
    spec = KVSpec.parse(f"retain=snapkv(window=6) budget=uniform(tokens={COVERING})")
    seq = SequenceKV(BlockPool(cfg.head_dim, block_size=4, num_blocks=256), cfg, spec, prompt_len=10)
    rotary = Rotary(cfg.rope_of(0), cfg.head_dim, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(4)
    group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    history: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]  # per layer, raw q [Hq, D] per token

    def chunk(start: int, n: int) -> None:
        pos = torch.arange(start, start + n)
        for layer in range(cfg.num_layers):
            q = torch.randn(n, cfg.num_heads, d, generator=g)
            kv = torch.randn(n, cfg.num_kv_heads, d, generator=g)
            seq.attend_layer(layer, q, kv, kv.clone(), pos, rotary, is_prefill=True, max_pos=start + n - 1)
            history[layer].extend(q.unbind(0))

    def check() -> None:
        seq._fold_pending_queries()  # (every reader folds first)
        for layer in range(cfg.num_layers):
            stored, ps = seq._window(layer)
            want = torch.stack(history[layer][-6:])  # [W, Hq, D]
            assert torch.equal(stored, want.view(len(want), cfg.num_kv_heads, group, d).permute(1, 2, 0, 3))
            assert ps.tolist() == list(range(len(history[layer]) - len(want), len(history[layer])))
        both, _ = seq.stacked_queries([1, 0])
        assert torch.equal(both, torch.cat([seq._window(1)[0], seq._window(0)[0]]))

    chunk(0, 4)
    check()
    position = 4
    for steps in (1, 3, 2, 6, 1):  # decode steps remembered, folded when read or when a window is full
        for _ in range(steps):
            q = torch.randn(cfg.num_layers, cfg.num_heads, d, generator=g)
            seq.remember_decode_queries(q, torch.tensor([position]))
            for layer in range(cfg.num_layers):
                history[layer].append(q[layer])
            position += 1
        check()
    assert seq._qstack is not None
    chunk(position, 3)  # a prompt chunk after decode steps (e.g. a continuation): per-layer windows again
    check()
