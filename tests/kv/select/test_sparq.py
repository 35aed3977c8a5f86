"""``select=sparq`` (SparQ Attention, arXiv:2312.04985): the approximate scores, the exact top-k at r = D, the
mean-value mix, the running mean value, and a covering budget reading everything (CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from longctx.engine.fast_decode import paged_decode_torch
from longctx.kv.select.attend import attend_selection, dense_as_paged
from longctx.kv.select.base import PagedRows, SelectState
from longctx.kv.select.sparq import SparQ

SCALE = 0.25  # 1 / sqrt(D) at D = 16


def paged(k: Tensor, v: Tensor, lengths: Tensor, bs: int, cap: int, seed: int = 0) -> PagedRows:
    """Dense rows k/v [B, H, L, D] (valid up to lengths [B, H]) in a pool of shuffled blocks (cap per row) with
    spare garbage blocks; table entries past a row's blocks point at other rows' blocks."""
    bsz, h, length, d = k.shape
    g = torch.Generator().manual_seed(seed)
    num_blocks = bsz * h * cap + 5
    tables = torch.randperm(num_blocks, generator=g)[: bsz * h * cap].view(bsz, h, cap)
    pk = torch.randn(num_blocks, bs, d, generator=g) * 7  # garbage wherever no token lies
    pv = torch.randn(num_blocks, bs, d, generator=g) * 7
    idx = torch.arange(length)
    blocks = tables[:, :, idx // bs]  # [B, H, L]
    pk[blocks, idx % bs] = k
    pv[blocks, idx % bs] = v
    pos = torch.zeros(num_blocks, bs, dtype=torch.long)
    return PagedRows(pk, pv, pos, tables, lengths.clone())


def append(rows: PagedRows, k_new: Tensor, v_new: Tensor) -> None:
    """Write one token [B, H, D] at index lengths of each row and grow lengths in place (as a decode step)."""
    bs = rows.block_size
    blocks = rows.block_tables.gather(-1, (rows.lengths // bs)[..., None]).squeeze(-1)
    rows.k[blocks, rows.lengths % bs] = k_new
    rows.v[blocks, rows.lengths % bs] = v_new
    rows.lengths += 1


def dense(rows: PagedRows) -> tuple[Tensor, Tensor, Tensor]:
    """k, v [B, H, cap * bs, D] and the valid mask [B, H, cap * bs] of each row, read back from the pool."""
    bsz, h, cap = rows.block_tables.shape
    bs, d = rows.block_size, rows.k.shape[-1]
    k = rows.k[rows.block_tables].reshape(bsz, h, cap * bs, d)
    v = rows.v[rows.block_tables].reshape(bsz, h, cap * bs, d)
    valid = torch.arange(cap * bs)[None, None, :] < rows.lengths[..., None]
    return k, v, valid


def batch(seed: int = 0, bsz: int = 3, h: int = 2, g: int = 2, d: int = 16, bs: int = 4, cap: int = 12,
          lengths: list[list[int]] | None = None) -> tuple[Tensor, PagedRows]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths or [[37, 21], [9, 30], [44, 44]][:bsz])
    length = int(lens.max())
    k = torch.randn(bsz, h, length, d, generator=gen)
    v = torch.randn(bsz, h, length, d, generator=gen)
    q = torch.randn(bsz, h * g, d, generator=gen)
    return q, paged(k, v, lens, bs, cap, seed)


def expected_scores(q: Tensor, rows: PagedRows, r: int) -> Tensor:
    """ŝ [B, H, G, L] by the paper's formula, written out per row and query head."""
    k, _, valid = dense(rows)
    bsz, h, length, d = k.shape
    g = q.shape[1] // h
    out = torch.zeros(bsz, h, g, length)
    for b in range(bsz):
        for kh in range(h):
            qs = q[b, kh * g:(kh + 1) * g]  # [G, D]
            comp = torch.sort(qs.abs().sum(0), descending=True, stable=True).indices[:r]
            n = int(rows.lengths[b, kh])
            for j in range(g):
                temp = math.sqrt(d * float(qs[j, comp].abs().sum() / qs[j].abs().sum()))
                out[b, kh, j, :n] = torch.softmax(k[b, kh, :n][:, comp] @ qs[j, comp] / temp, dim=0)
    return out * valid[:, :, None, :]


def top_sets(vote: Tensor, lengths: Tensor, num: int) -> list[list[set[int]]]:
    return [[set(torch.sort(vote[b, h, : int(lengths[b, h])], descending=True, stable=True).indices[:num].tolist())
             for h in range(vote.shape[1])] for b in range(vote.shape[0])]


def chosen_sets(tokens: Tensor) -> list[list[set[int]]]:
    return [[set(t for t in row.tolist() if t >= 0) for row in seq] for seq in tokens]


def test_a_budget_covering_the_rows_reads_everything_exactly() -> None:
    q, rows = batch()
    all_out = paged_decode_torch(q, rows.k, rows.v, rows.block_tables, rows.lengths, SCALE)
    cap_tokens = rows.block_tables.shape[-1] * rows.block_size
    for tokens in (cap_tokens, cap_tokens + 100):
        method = SparQ(r=4, tokens=tokens)
        sel = method.select(0, q, rows, SelectState())
        assert sel is None
        assert method.extra_bytes_read(0, rows, SelectState()) is None
        assert torch.equal(attend_selection(q, rows, sel, SCALE, None, paged_decode_torch), all_out)
    # a budget covering every row's tokens (not the capacity) reads them all with no mean-value weight
    sel = SparQ(r=4, tokens=int(rows.lengths.max())).select(0, q, rows, SelectState())
    assert sel is not None and torch.equal(sel.residual_weight, torch.zeros_like(sel.residual_weight))
    assert torch.equal((sel.tokens >= 0).sum(-1), rows.lengths)
    out = attend_selection(q, rows, sel, SCALE, None, paged_decode_torch)
    torch.testing.assert_close(out, all_out, rtol=1e-5, atol=1e-5)


def test_the_approximate_scores_follow_the_paper_formula_with_group_components() -> None:
    q, rows = batch(seed=1)
    for r in (1, 3, 8):
        num = 6
        sel = SparQ(r=r, tokens=num).select(0, q, rows, SelectState())
        s_hat = expected_scores(q, rows, r)
        assert chosen_sets(sel.tokens) == top_sets(s_hat.sum(2), rows.lengths, num)
        alpha = torch.stack([torch.stack([s_hat[b, h][:, sel.tokens[b, h].clamp(min=0)].mul(sel.tokens[b, h] >= 0)
                                          .sum(-1) for h in range(2)]) for b in range(3)])
        torch.testing.assert_close(sel.residual_weight, 1 - alpha, rtol=1e-5, atol=1e-6)


def test_r_equal_to_the_head_size_selects_the_exact_top_k() -> None:
    q, rows = batch(seed=2)
    k, _, valid = dense(rows)
    qg = q.view(3, 2, 2, 16)
    logits = (qg @ k.transpose(-1, -2) * SCALE).masked_fill(~valid[:, :, None, :], float("-inf"))
    vote = torch.softmax(logits, dim=-1).sum(2)  # exact probabilities summed over the group
    for r in (16, 64):  # r >= D: every component
        for num in (5, 12):
            sel = SparQ(r=r, tokens=num).select(0, q, rows, SelectState())
            assert chosen_sets(sel.tokens) == top_sets(vote, rows.lengths, num)
    # a row shorter than the budget reads all its tokens, padded with -1
    sel = SparQ(r=16, tokens=12).select(0, q, rows, SelectState())
    assert chosen_sets(sel.tokens)[1][0] == set(range(9)) and (sel.tokens[1, 0] == -1).sum() == 3
    assert torch.equal(sel.residual_weight[1, 0], torch.zeros(2))


def test_the_output_is_the_mean_value_mix_of_the_top_k_attention() -> None:
    q, rows = batch(seed=3)
    k, v, valid = dense(rows)
    num, r = 7, 5
    sel = SparQ(r=r, tokens=num).select(0, q, rows, SelectState())
    out = attend_selection(q, rows, sel, SCALE, None, paged_decode_torch)
    s_hat = expected_scores(q, rows, r)
    expected = torch.zeros(3, 4, 16)
    for b in range(3):
        for kh in range(2):
            n = int(rows.lengths[b, kh])
            idx = torch.tensor(sorted(chosen_sets(sel.tokens)[b][kh]))
            mean = v[b, kh, :n].mean(0)
            for j in range(2):
                hq = kh * 2 + j
                alpha = s_hat[b, kh, j, idx].sum()
                p = torch.softmax(k[b, kh, idx] @ q[b, hq] * SCALE, dim=0)
                expected[b, hq] = alpha * (p @ v[b, kh, idx]) + (1 - alpha) * mean
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sel.residual_value, (v * valid[..., None]).sum(2) / rows.lengths[..., None],
                               rtol=1e-5, atol=1e-6)


def test_the_running_mean_value_equals_the_direct_mean_after_appended_steps() -> None:
    q, rows = batch(seed=4, cap=14)
    gen = torch.Generator().manual_seed(5)
    method = SparQ(r=4, tokens=8)
    state = SelectState(per_seq=[{}, {}, {}])
    d, esize = 16, 4
    for step in range(6):
        if step:
            append(rows, torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, 16, generator=gen))
        if step == 4:
            state.per_seq[1].clear()  # the engine compacted sequence 1: its sums are rebuilt from the rows
        sel = method.select(3, q, rows, state)
        _, v, valid = dense(rows)
        direct = (v * valid[..., None]).sum(2) / rows.lengths[..., None]
        torch.testing.assert_close(sel.residual_value, direct, rtol=1e-5, atol=1e-6)
        extra = method.extra_bytes_read(3, rows, state)
        v_tokens = torch.ones_like(rows.lengths) if step else rows.lengths.clone()
        if step == 4:
            v_tokens[1] = rows.lengths[1]
        assert torch.equal(extra, rows.lengths * 4 * esize + v_tokens * d * esize)
    # another layer keeps its own sums
    sel = method.select(0, q, rows, state)
    torch.testing.assert_close(sel.residual_value, direct, rtol=1e-5, atol=1e-6)


def test_the_per_sequence_path_chooses_as_the_batched_step() -> None:
    q, rows = batch(seed=6)
    k, v, _ = dense(rows)
    method = SparQ(r=6, tokens=10)
    sel = method.select(0, q, rows, SelectState())
    out = attend_selection(q, rows, sel, SCALE, None, paged_decode_torch)
    for b in range(3):
        one = dense_as_paged(k[b], v[b], torch.zeros(2, k.shape[2], dtype=torch.long), rows.lengths[b], 4,
                             summaries=False)
        sel_one = method.select(0, q[b:b + 1], one, SelectState())
        assert torch.equal(sel_one.tokens, sel.tokens[b:b + 1])
        torch.testing.assert_close(attend_selection(q[b:b + 1], one, sel_one, SCALE, None, paged_decode_torch),
                                   out[b:b + 1], rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_earlier_token_and_the_choice_is_deterministic() -> None:
    h, length, d = 2, 20, 16
    k = torch.ones(h, length, d)  # every token scores the same
    v = torch.randn(h, length, d, generator=torch.Generator().manual_seed(7))
    rows = dense_as_paged(k, v, torch.zeros(h, length, dtype=torch.long), torch.tensor([20, 13]), 4, summaries=False)
    q = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(8))
    method = SparQ(r=3, tokens=5)
    first = method.select(0, q, rows, SelectState())
    assert first.tokens[0].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert torch.equal(method.select(0, q, rows, SelectState()).tokens, first.tokens)


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="r must be >= 1"):
        SparQ(r=0)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        SparQ(tokens=0)
    assert (SparQ().r, SparQ().tokens) == (32, 1024)
