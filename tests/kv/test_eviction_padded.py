"""The batched eviction path: ``select_keep_padded`` chooses what ``select_keep`` chooses (one padded tensor,
counts on the host) and ``RowSet.compact_padded`` leaves rows exactly as ``RowSet.compact`` does."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.kv.eviction import select_keep, select_keep_padded
from longctx.kv.pool import NULL_BLOCK, BlockPool
from longctx.kv.rows import RowSet

SETTINGS = settings(max_examples=150, deadline=None)


# ---- select_keep_padded ------------------------------------------------------------------------------------
def _case(seed: int, num_heads: int, max_len: int, budget: int, extra_pad: int):
    """Random lengths; every row's budget is ``budget`` or, for a row within it, anything >= its length
    but no more than needed to keep ``budget`` the widest count (uniform/pyramid allocators)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_heads,), generator=g).tolist()
    budgets = []
    for n in lengths:
        if n > budget or torch.rand(1, generator=g).item() < 0.5:
            budgets.append(budget)
        else:  # within its budget: a budget of its own, still >= its length
            budgets.append(n + int(torch.randint(0, 5, (1,), generator=g)))
    width = max_len + extra_pad
    scores = torch.randperm(num_heads * width, generator=g).float().view(num_heads, width)  # distinct
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))  # as the engine passes them
    return scores, lengths, budgets


def _assert_same_choice(scores: torch.Tensor, lengths: list[int], budgets: list[int], sinks: int,
                        recent: list[int]) -> tuple[torch.Tensor, list[int]]:
    out = select_keep_padded(scores, lengths, budgets, sinks, recent)
    assert out is not None
    idx, counts = out
    expected = select_keep(scores, lengths, budgets, sinks, recent)
    assert counts == [min(n, max(b, 0)) for n, b in zip(lengths, budgets, strict=True)]
    assert idx.dtype == torch.int64 and idx.dim() == 2 and idx.shape[0] == len(lengths)
    assert idx.shape[1] >= max(counts)
    for h, c in enumerate(counts):
        assert idx[h, :c].tolist() == expected[h].tolist(), (h, lengths, budgets, sinks, recent)
        assert len(expected[h]) == c
    return idx, counts


@SETTINGS
@given(seed=st.integers(0, 2**31), num_heads=st.integers(1, 6), max_len=st.integers(0, 40),
       budget=st.integers(0, 30), extra_pad=st.integers(0, 5), sinks=st.integers(0, 4), data=st.data())
def test_padded_selection_equals_select_keep(seed: int, num_heads: int, max_len: int, budget: int, extra_pad: int,
                                             sinks: int, data: st.DataObject) -> None:
    scores, lengths, budgets = _case(seed, num_heads, max_len, budget, extra_pad)
    recent = data.draw(st.lists(st.integers(0, 6), min_size=num_heads, max_size=num_heads), label="recent")
    idx, counts = _assert_same_choice(scores, lengths, budgets, sinks, recent)
    width = scores.shape[1]
    for h, (n, b) in enumerate(zip(lengths, budgets, strict=True)):
        kept = idx[h, : counts[h]]
        assert bool((kept < n).all()) and bool((kept[1:] > kept[:-1]).all())  # valid, sorted, distinct
        if n > b:  # forced sinks and recent tokens are kept
            num_sinks = min(sinks, b)
            num_recent = min(recent[h], b - num_sinks)
            forced = set(range(num_sinks)) | set(range(n - num_recent, n))
            assert forced <= set(kept.tolist())
        else:
            assert kept.tolist() == list(range(n))
    assert idx.shape[1] <= max(width, budget, 1)


@pytest.mark.parametrize("seed", range(40))
def test_padded_selection_seeded_cases(seed: int) -> None:
    """Deterministic sweep (also without -inf padding: scores past a row's length are ignored either way)."""
    g = torch.Generator().manual_seed(1000 + seed)
    num_heads = int(torch.randint(1, 9, (1,), generator=g))
    max_len = int(torch.randint(1, 64, (1,), generator=g))
    budget = int(torch.randint(0, max_len + 3, (1,), generator=g))
    scores, lengths, budgets = _case(seed, num_heads, max_len, budget, int(torch.randint(0, 4, (1,), generator=g)))
    sinks = int(torch.randint(0, 5, (1,), generator=g))
    recent = torch.randint(0, 7, (num_heads,), generator=g).tolist()
    _assert_same_choice(scores, lengths, budgets, sinks, recent)
    raw = torch.randperm(scores.numel(), generator=g).float().view_as(scores)  # padding not masked
    _assert_same_choice(raw, lengths, budgets, sinks, recent)


def test_padded_selection_hand_case() -> None:
    # row 0: over budget 4 with 1 sink, 1 recent -> {0, 9} + the two best of 1..8 (scores 90 at 3, 80 at 6)
    # row 1: 3 tokens, within its budget, keeps all; row 2: empty
    scores = torch.full((3, 10), float("-inf"))
    scores[0] = torch.tensor([1.0, 5, 6, 90, 7, 8, 80, 2, 3, 4])
    scores[1, :3] = torch.tensor([3.0, 2, 1])
    idx, counts = select_keep_padded(scores, [10, 3, 0], [4, 4, 4], 1, [1, 1, 1])
    assert counts == [4, 3, 0]
    assert idx[0, :4].tolist() == [0, 3, 6, 9]
    assert idx[1, :3].tolist() == [0, 1, 2]


def test_budget_zero_keeps_nothing() -> None:
    scores = torch.randperm(3 * 8).float().view(3, 8)
    idx, counts = select_keep_padded(scores, [8, 5, 0], [0, 0, 0], 4, [6, 6, 6])
    assert counts == [0, 0, 0]
    assert idx.shape[0] == 3 and idx.shape[1] >= 1
    assert [k.numel() for k in select_keep(scores, [8, 5, 0], [0, 0, 0], 4, [6, 6, 6])] == [0, 0, 0]


def test_budget_larger_than_width() -> None:
    """Budget larger than the score tensor's width (rows within budget only, or the widest row over it)."""
    scores = torch.randperm(2 * 5).float().view(2, 5)
    idx, counts = select_keep_padded(scores, [5, 2], [50, 50], 2, [3, 3])
    assert counts == [5, 2]
    assert idx[0, :5].tolist() == [0, 1, 2, 3, 4] and idx[1, :2].tolist() == [0, 1]
    _assert_same_choice(scores, [5, 3], [4, 50], 1, [1, 1])


def test_different_budgets_per_row_match_select_keep() -> None:
    """Head-wise (adaptive) and layer-stacked rows: every row its own budget, one batched selection."""
    scores = torch.randperm(3 * 10).float().view(3, 10)
    _assert_same_choice(scores, [10, 10, 4], [5, 6, 8], 1, [2, 2, 2])
    _assert_same_choice(scores, [10, 9, 10], [3, 3, 0], 0, [0, 0, 0])
    _assert_same_choice(scores, [10, 10, 4], [5, 5, 8], 1, [2, 2, 2])
    _, counts = select_keep_padded(scores, [3, 4, 5], [5, 6, 7], 1, [1, 1, 1])  # nothing over budget
    assert counts == [3, 4, 5]


@pytest.mark.parametrize("seed", range(10))
def test_nan_scores_do_not_crash(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_heads, width, budget, sinks = 4, 24, 7, 2
    lengths = [24, 20, 15, 5]
    recent = [3, 0, 2, 1]
    scores = torch.randperm(num_heads * width, generator=g).float().view(num_heads, width)
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    # one NaN per row: it sorts lowest in both (select_keep treats NaN as -inf), choice still unique
    one = scores.clone()
    for h, n in enumerate(lengths):
        one[h, int(torch.randint(0, n, (1,), generator=g))] = float("nan")
    _assert_same_choice(one, lengths, [budget] * num_heads, sinks, recent)
    # many NaNs (ties): no crash, right counts, valid distinct sorted indices, forced kept, NaNs chosen last
    many = scores.clone()
    nan_mask = (torch.rand(num_heads, width, generator=g) < 0.4) & valid
    many[nan_mask] = float("nan")
    out = select_keep_padded(many, lengths, [budget] * num_heads, sinks, recent)
    assert out is not None
    idx, counts = out
    assert counts == [min(n, budget) for n in lengths]
    for h, n in enumerate(lengths):
        kept = idx[h, : counts[h]].tolist()
        assert kept == sorted(set(kept)) and all(0 <= j < n for j in kept)
        if n > budget:
            forced = set(range(min(sinks, budget))) | set(range(n - min(recent[h], budget - min(sinks, budget)), n))
            assert forced <= set(kept)
            chosen = [j for j in kept if j not in forced]
            free_ok = [j for j in range(n) if j not in forced and not nan_mask[h, j]]
            # a NaN is only chosen once every non-NaN candidate is
            if any(bool(nan_mask[h, j]) for j in chosen):
                assert set(free_ok) <= set(chosen)
            else:
                best = sorted(free_ok, key=lambda j: -float(many[h, j]))[: len(chosen)]
                assert sorted(best) == chosen
    # all-NaN scores
    all_nan = torch.full((num_heads, width), float("nan"))
    out = select_keep_padded(all_nan, lengths, [budget] * num_heads, sinks, recent)
    assert out is not None and out[1] == [min(n, budget) for n in lengths]
    for h, n in enumerate(lengths):
        kept = out[0][h, : out[1][h]].tolist()
        assert kept == sorted(set(kept)) and all(0 <= j < n for j in kept)


# ---- compact_padded ----------------------------------------------------------------------------------------
def _build(seed: int, num_layers: int, num_heads: int, head_dim: int, block_size: int,
           rounds: list[int]) -> RowSet:
    """A RowSet filled by appends, random scores and random compactions (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    pool = BlockPool(head_dim=head_dim, block_size=block_size, num_blocks=3, max_blocks=100_000)
    rs = RowSet(pool, num_layers, num_heads)
    pos = [0] * num_layers
    for i, n in enumerate(rounds):
        for layer in range(num_layers):
            k = torch.randn(n, num_heads, head_dim, generator=g)
            v = torch.randn(n, num_heads, head_dim, generator=g)
            rs.append(layer, k, v, torch.arange(pos[layer], pos[layer] + n) * 2 + 1)
            pos[layer] += n
            view = rs.gather(layer)
            rs.write_scores(view, torch.rand(view.valid.shape, generator=g))
            if i < len(rounds) - 1:  # make rows of one layer differ in length
                view = rs.gather(layer)
                keep = []
                for h in range(num_heads):
                    m = rs.lengths[layer][h]
                    mask = torch.rand(m, generator=g) < 0.7
                    keep.append(torch.nonzero(mask).flatten())
                rs.compact(layer, view, keep)
    return rs


def _padded(keep: list[torch.Tensor], width: int, junk_max: int, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    counts = [int(k.numel()) for k in keep]
    idx = torch.randint(0, junk_max + 1, (len(keep), width), generator=g)  # padding: junk, must be ignored
    for h, k in enumerate(keep):
        idx[h, : k.numel()] = k
    return idx, counts


def _snapshot(rs: RowSet) -> dict:
    pool = rs.pool
    views = [rs.gather(layer) for layer in range(rs.num_layers)]
    return dict(
        lengths=[list(x) for x in rs.lengths],
        blocks=[[list(b) for b in layer] for layer in rs.blocks],
        free=list(pool.free_blocks), ref_cnt=list(pool.ref_cnt), num_blocks=pool.num_blocks,
        views=[(v.k, v.v, v.pos, v.score, v.valid, v.lengths, v.slots) for v in views],
        null=(pool.k[NULL_BLOCK].clone(), pool.v[NULL_BLOCK].clone(), pool.pos[NULL_BLOCK].clone(),
              pool.score[NULL_BLOCK].clone()),
        bytes=rs.bytes_held(), tokens=rs.num_tokens(),
    )


def _assert_same_state(a: RowSet, b: RowSet) -> None:
    sa, sb = _snapshot(a), _snapshot(b)
    for key in ("lengths", "blocks", "free", "ref_cnt", "num_blocks", "bytes", "tokens"):
        assert sa[key] == sb[key], key
    for layer, (va, vb) in enumerate(zip(sa["views"], sb["views"], strict=True)):
        for name, x, y in zip(("k", "v", "pos", "score", "valid", "lengths", "slots"), va, vb, strict=True):
            assert x.shape == y.shape and torch.equal(x, y), (layer, name)
    for x, y in zip(sa["null"], sb["null"], strict=True):
        assert torch.equal(x, y) and not x.any()  # nothing written into the null block
    a.pool.check_invariants()
    b.pool.check_invariants()
    bs = a.pool.block_size
    for layer in range(a.num_layers):
        for h in range(a.num_kv_heads):
            assert len(a.blocks[layer][h]) == math.ceil(a.lengths[layer][h] / bs)


def _compact_both(seed: int, num_layers: int, num_heads: int, head_dim: int, block_size: int,
                  rounds: list[int], layer: int, keep_fn, extra_width: int) -> tuple[RowSet, RowSet]:  # noqa: ANN001
    a = _build(seed, num_layers, num_heads, head_dim, block_size, rounds)
    b = _build(seed, num_layers, num_heads, head_dim, block_size, rounds)
    _assert_same_state(a, b)
    va, vb = a.gather(layer), b.gather(layer)
    keep = keep_fn(a.lengths[layer])
    g = torch.Generator().manual_seed(seed + 1)
    width = max([int(k.numel()) for k in keep] + [0]) + extra_width
    idx, counts = _padded(keep, width, va.k.shape[1], g)
    marks = [(rs.version, rs.layer_version[layer], rs.reindexed) for rs in (a, b)]
    a.compact(layer, va, keep)
    b.compact_padded(layer, vb, idx, counts)
    # a cut keeps the rows' first blocks in place: not structural (device tables only re-read lengths), but
    # the layer's blocks changed and row indices moved
    for rs, (version, layer_version, reindexed) in zip((a, b), marks, strict=True):
        assert rs.version == version and rs.layer_version[layer] > layer_version and rs.reindexed > reindexed
    _assert_same_state(a, b)
    # and the kept tokens are the chosen ones, in order
    after = b.gather(layer)
    for h, k in enumerate(keep):
        n = int(k.numel())
        assert torch.equal(after.k[h, :n], vb.k[h, k]) and torch.equal(after.v[h, :n], vb.v[h, k])
        assert torch.equal(after.pos[h, :n], vb.pos[h, k]) and torch.equal(after.score[h, :n], vb.score[h, k])
    return a, b


@SETTINGS
@given(seed=st.integers(0, 2**31), num_layers=st.integers(1, 3), num_heads=st.integers(1, 5),
       head_dim=st.integers(1, 6), block_size=st.integers(1, 6),
       rounds=st.lists(st.integers(0, 12), min_size=1, max_size=3), extra_width=st.integers(0, 3), data=st.data())
def test_compact_padded_equals_compact(seed: int, num_layers: int, num_heads: int, head_dim: int, block_size: int,
                                      rounds: list[int], extra_width: int, data: st.DataObject) -> None:
    layer = data.draw(st.integers(0, num_layers - 1), label="layer")

    def keep_fn(lengths: list[int]) -> list[torch.Tensor]:
        keep = []
        for h, n in enumerate(lengths):
            kind = data.draw(st.sampled_from(["all", "none", "some"]), label=f"kind{h}")
            if kind == "all":
                keep.append(torch.arange(n))
            elif kind == "none":
                keep.append(torch.zeros(0, dtype=torch.int64))
            else:
                keep.append(torch.tensor(sorted(data.draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n),
                                                          label=f"keep{h}")), dtype=torch.int64)[:n])
                keep[-1] = keep[-1][keep[-1] < n]
        return keep

    _compact_both(seed, num_layers, num_heads, head_dim, block_size, rounds, layer, keep_fn, extra_width)


def test_compact_padded_mixed_rows() -> None:
    """Keeps everything / keeps nothing / keeps a few (frees blocks) / frees exactly one block; bs 4."""

    def keep_fn(lengths: list[int]) -> list[torch.Tensor]:
        n0, n1, n2, n3 = lengths
        assert min(lengths) > 8
        return [torch.arange(n0), torch.zeros(0, dtype=torch.int64), torch.tensor([1, 4, n2 - 1]),
                torch.arange(0, n3 - 4)]

    a, b = _compact_both(3, 2, 4, 5, 4, [23], 1, keep_fn, 2)
    assert b.lengths[1] == [23, 0, 3, 19]
    assert [len(x) for x in b.blocks[1]] == [6, 0, 1, 5]
    assert b.lengths[0] == [23, 23, 23, 23]  # the other layer untouched


def test_compact_padded_from_select_keep_padded() -> None:
    """The engine's pairing: select_keep_padded -> compact_padded equals select_keep -> compact."""
    for seed in range(8):
        a = _build(seed, 2, 3, 4, 3, [17, 9])
        b = _build(seed, 2, 3, 4, 3, [17, 9])
        for layer in range(2):
            va, vb = a.gather(layer), b.gather(layer)
            g = torch.Generator().manual_seed(seed)
            scores = torch.randperm(va.valid.numel(), generator=g).float().view_as(va.score)
            scores = scores.masked_fill(~va.valid, float("-inf"))
            lengths = a.lengths[layer]
            budget = max(min(lengths) - 2, 0)
            budgets, recent = [budget] * 3, [2, 0, 5]
            padded = select_keep_padded(scores, lengths, budgets, 1, recent)
            assert padded is not None
            a.compact(layer, va, select_keep(scores, lengths, budgets, 1, recent))
            b.compact_padded(layer, vb, *padded)
            _assert_same_state(a, b)


def test_compact_padded_all_empty_keep() -> None:
    """Zero-width index tensor (every row keeps nothing)."""
    a = _build(5, 1, 3, 2, 2, [7])
    b = _build(5, 1, 3, 2, 2, [7])
    keep = [torch.zeros(0, dtype=torch.int64)] * 3
    a.compact(0, a.gather(0), keep)
    b.compact_padded(0, b.gather(0), torch.zeros(3, 0, dtype=torch.int64), [0, 0, 0])
    _assert_same_state(a, b)
    assert b.num_blocks == 0 and b.pool.num_used_blocks == 0


def test_row_within_a_larger_budget_does_not_widen_the_others() -> None:
    """Row 1 keeps 20 tokens within its budget of 28; row 0 must still get its own best 6 (found by review,
    when the batched selection took one top-k of the widest row's width)."""
    scores = torch.arange(40.0).view(2, 20)
    idx, counts = select_keep_padded(scores, [20, 20], [6, 28], sinks=1, recent=[1, 1])
    assert counts == [6, 20] and idx[0, :6].tolist() == [0, 15, 16, 17, 18, 19]
    assert select_keep(scores, [20, 20], [6, 28], sinks=1, recent=[1, 1])[0].tolist() == [0, 15, 16, 17, 18, 19]


def test_exact_ties_go_to_the_earlier_token_in_both_selections() -> None:
    """Max-pooled scores tie often; the choice must not depend on the device's topk (CPU and CUDA differ)."""
    scores = torch.tensor([[5.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.0, 9.0], [2.0] * 8])
    keep = select_keep(scores, [8, 8], [4, 4], sinks=0, recent=[0, 0])
    assert keep[0].tolist() == [0, 2, 3, 7] and keep[1].tolist() == [0, 1, 2, 3]
    padded = select_keep_padded(scores, [8, 8], [4, 4], sinks=0, recent=[0, 0])
    assert padded is not None
    idx, counts = padded
    assert [idx[h, : counts[h]].tolist() for h in range(2)] == [[0, 2, 3, 7], [0, 1, 2, 3]]
