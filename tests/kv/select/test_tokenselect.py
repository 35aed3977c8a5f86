"""``select=tokenselect`` (TokenSelect, arXiv:2411.02886): the per-head soft vote, the newest token always read,
the Selection Cache reusing a choice iff the query stays similar (per sequence of a batch), and a covering
budget reading everything (CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from longctx.engine.fast_decode import paged_decode_torch
from longctx.kv.select.attend import attend_selection, dense_as_paged
from longctx.kv.select.base import PagedRows, SelectState
from longctx.kv.select.tokenselect import TokenSelect

SCALE = 0.25  # 1 / sqrt(D) at D = 16
D = 16


def paged(k: Tensor, v: Tensor, lengths: Tensor, bs: int, cap: int, seed: int = 0) -> PagedRows:
    """Dense rows k/v [B, H, L, D] (valid up to lengths [B, H]) in a pool of shuffled blocks (cap per row) with
    spare garbage blocks; table entries past a row's blocks point at other rows' blocks."""
    bsz, h, length, d = k.shape
    g = torch.Generator().manual_seed(seed)
    num_blocks = bsz * h * cap + 5
    tables = torch.randperm(num_blocks, generator=g)[: bsz * h * cap].view(bsz, h, cap)
    pk = torch.randn(num_blocks, bs, d, generator=g) * 7
    pv = torch.randn(num_blocks, bs, d, generator=g) * 7
    idx = torch.arange(length)
    blocks = tables[:, :, idx // bs]
    pk[blocks, idx % bs] = k
    pv[blocks, idx % bs] = v
    return PagedRows(pk, pv, torch.zeros(num_blocks, bs, dtype=torch.long), tables, lengths.clone())


def append(rows: PagedRows, k_new: Tensor, v_new: Tensor) -> None:
    """Write one token [B, H, D] at index lengths of each row and grow lengths in place (as a decode step)."""
    bs = rows.block_size
    blocks = rows.block_tables.gather(-1, (rows.lengths // bs)[..., None]).squeeze(-1)
    rows.k[blocks, rows.lengths % bs] = k_new
    rows.v[blocks, rows.lengths % bs] = v_new
    rows.lengths += 1


def dense_k(rows: PagedRows) -> Tensor:
    bsz, h, cap = rows.block_tables.shape
    return rows.k[rows.block_tables].reshape(bsz, h, cap * rows.block_size, rows.k.shape[-1])


def batch(seed: int = 0, g: int = 2, cap: int = 12, lengths: list[list[int]] | None = None
          ) -> tuple[Tensor, PagedRows]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths or [[37, 21], [9, 30], [44, 44]])
    bsz, h = lens.shape
    length = int(lens.max())
    k = torch.randn(bsz, h, length, D, generator=gen)
    v = torch.randn(bsz, h, length, D, generator=gen)
    q = torch.randn(bsz, h * g, D, generator=gen)
    return q, paged(k, v, lens, 4, cap, seed)


def expected_sets(q: Tensor, rows: PagedRows, num: int) -> list[list[set[int]]]:
    """Per row: the newest token plus the top num - 1 others by the summed per-head softmax of raw q·k."""
    k = dense_k(rows)
    bsz, h = rows.lengths.shape
    g = q.shape[1] // h
    out = []
    for b in range(bsz):
        seq = []
        for kh in range(h):
            n = int(rows.lengths[b, kh])
            vote = torch.softmax(q[b, kh * g:(kh + 1) * g] @ k[b, kh, :n].T, dim=-1).sum(0)
            vote[n - 1] = float("inf")
            seq.append(set(torch.sort(vote, descending=True, stable=True).indices[:num].tolist()))
        out.append(seq)
    return out


def chosen(tokens: Tensor) -> list[list[set[int]]]:
    return [[set(t for t in row.tolist() if t >= 0) for row in seq] for seq in tokens]


def rotated(q: Tensor, cos: float, seed: int, toward: Tensor | None = None) -> Tensor:
    """A query with the given cosine similarity to q (flattened per sequence), turned toward ``toward``."""
    flat = q.reshape(q.shape[0], -1)
    u = toward.reshape(flat.shape) if toward is not None else torch.randn(
        flat.shape, generator=torch.Generator().manual_seed(seed))
    u = u - (u * flat).sum(-1, keepdim=True) / (flat * flat).sum(-1, keepdim=True) * flat
    u = u / u.norm(dim=-1, keepdim=True) * flat.norm(dim=-1, keepdim=True)
    return (cos * flat + math.sqrt(1 - cos * cos) * u).reshape(q.shape)


def test_a_budget_covering_the_rows_reads_everything_exactly() -> None:
    q, rows = batch()
    all_out = paged_decode_torch(q, rows.k, rows.v, rows.block_tables, rows.lengths, SCALE)
    cap_tokens = rows.block_tables.shape[-1] * rows.block_size
    for tokens in (cap_tokens, cap_tokens + 1):
        method = TokenSelect(tokens=tokens)
        sel = method.select(0, q, rows, SelectState())
        assert sel is None and method.extra_bytes_read(0, rows, SelectState()) is None
        assert torch.equal(attend_selection(q, rows, sel, SCALE, None, paged_decode_torch), all_out)
    sel = TokenSelect(tokens=int(rows.lengths.max())).select(0, q, rows, SelectState())
    assert torch.equal((sel.tokens >= 0).sum(-1), rows.lengths)
    torch.testing.assert_close(attend_selection(q, rows, sel, SCALE, None, paged_decode_torch), all_out,
                               rtol=1e-5, atol=1e-5)


def test_the_soft_vote_sums_per_head_softmax_over_the_group_and_keeps_the_newest_token() -> None:
    for g in (1, 2, 4):
        q, rows = batch(seed=g, g=g)
        for num in (1, 6, 15):
            sel = TokenSelect(tokens=num).select(0, q, rows, SelectState())
            assert chosen(sel.tokens) == expected_sets(q, rows, num)
            assert all((sel.tokens[b, h] == rows.lengths[b, h] - 1).any() for b in range(3) for h in range(2))


def test_the_newest_token_is_read_even_when_it_scores_lowest() -> None:
    q, rows = batch(seed=3)
    gen = torch.Generator().manual_seed(4)
    method = TokenSelect(tokens=4, threshold=-1.0)  # always similar: the later steps reuse
    state = SelectState()
    for step in range(4):
        if step:
            low = -q.view(3, 2, 2, D).sum(2) * 10  # the most negative q·k for the whole group
            append(rows, low, torch.randn(3, 2, D, generator=gen))
        sel = method.select(0, q, rows, state)
        newest = rows.lengths - 1
        assert ((sel.tokens == newest[..., None]).sum(-1) == 1).all()


def test_the_selection_is_reused_iff_the_query_is_similar_per_sequence() -> None:
    q1, rows = batch(seed=5, cap=14)
    gen = torch.Generator().manual_seed(6)
    num = 8
    method = TokenSelect(tokens=num, threshold=0.9)
    state = SelectState(per_seq=[{}, {}, {}])
    full = rows.lengths * D * 4
    first = method.select(2, q1, rows, state)
    assert chosen(first.tokens) == expected_sets(q1, rows, num)
    assert torch.equal(method.extra_bytes_read(2, rows, state), full)

    # sequence 0: cosine 0.95 (reuse); 1: 0.85 (reselect); 2: 0.95 (reuse)
    q2 = torch.stack([rotated(q1[i:i + 1], c, seed=i)[0] for i, c in enumerate((0.95, 0.85, 0.95))])
    append(rows, torch.randn(3, 2, D, generator=gen), torch.randn(3, 2, D, generator=gen))
    second = method.select(2, q2, rows, state)
    fresh = expected_sets(q2, rows, num)
    for b in range(3):
        for h in range(2):
            got = chosen(second.tokens)[b][h]
            if b == 1:
                assert got == fresh[b][h]
            else:  # the first step's choice plus the token added since
                assert got == chosen(first.tokens)[b][h] | {int(rows.lengths[b, h]) - 1}
    extra = method.extra_bytes_read(2, rows, state)
    assert torch.equal(extra[0], torch.zeros(2, dtype=extra.dtype)) and torch.equal(extra[2], extra[0])
    assert torch.equal(extra[1], rows.lengths[1] * D * 4)

    # sequence 0 turns on toward cosine 0.85 with the first (selecting) query, though 0.97 with the last one:
    # the cache compares with the query of the step that selected, so it reselects
    toward = q2[0:1] - 0.95 * q1[0:1]
    q3 = q2.clone()
    q3[0] = rotated(q1[0:1], 0.85, seed=0, toward=toward)[0]
    cos_last = torch.nn.functional.cosine_similarity(q3[0].flatten(), q2[0].flatten(), dim=0)
    assert cos_last > 0.95
    append(rows, torch.randn(3, 2, D, generator=gen), torch.randn(3, 2, D, generator=gen))
    third = method.select(2, q3, rows, state)
    assert chosen(third.tokens)[0] == expected_sets(q3, rows, num)[0]
    # sequence 2 reuses again: the first choice plus both tokens added since
    assert chosen(third.tokens)[2] == [chosen(first.tokens)[2][h] | {int(rows.lengths[2, h]) - 2,
                                                                       int(rows.lengths[2, h]) - 1} for h in range(2)]


def test_a_selection_is_reused_for_at_most_max_reuse_new_tokens() -> None:
    q, rows = batch(seed=7, cap=14)
    gen = torch.Generator().manual_seed(8)
    method = TokenSelect(tokens=5, threshold=-1.0, max_reuse=2)
    state = SelectState()
    reused = []
    for step in range(5):
        if step:
            append(rows, torch.randn(3, 2, D, generator=gen), torch.randn(3, 2, D, generator=gen))
        sel = method.select(0, q, rows, state)
        reused.append(bool((method.extra_bytes_read(0, rows, state) == 0).all()))
        if not reused[-1]:
            assert chosen(sel.tokens) == expected_sets(q, rows, 5)
    assert reused == [False, True, True, False, True]


def test_an_emptied_state_reselects_and_layers_keep_their_own_cache() -> None:
    q, rows = batch(seed=9, cap=14)
    method = TokenSelect(tokens=6, threshold=0.0)
    state = SelectState()
    method.select(0, q, rows, state)
    append(rows, torch.randn(3, 2, D), torch.randn(3, 2, D))
    state.per_seq[1].clear()  # the engine compacted sequence 1
    method.select(0, q, rows, state)
    assert method.extra_bytes_read(0, rows, state)[:, 0].eq(0).tolist() == [True, False, True]
    method.select(1, q, rows, state)  # a layer seen for the first time selects
    assert (method.extra_bytes_read(1, rows, state) > 0).all()


def test_the_per_sequence_path_chooses_as_the_batched_step() -> None:
    q, rows = batch(seed=10)
    k = dense_k(rows)
    v = rows.v[rows.block_tables].reshape(k.shape)
    method = TokenSelect(tokens=9)
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
    h, length = 2, 20
    k = torch.ones(h, length, D)
    v = torch.randn(h, length, D, generator=torch.Generator().manual_seed(11))
    rows = dense_as_paged(k, v, torch.zeros(h, length, dtype=torch.long), torch.tensor([20, 13]), 4, summaries=False)
    q = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(12))
    method = TokenSelect(tokens=5, max_reuse=3)
    first = method.select(0, q, rows, SelectState())
    assert first.tokens[0].tolist() == [[19, 0, 1, 2, 3, -1, -1, -1], [12, 0, 1, 2, 3, -1, -1, -1]]
    assert torch.equal(method.select(0, q, rows, SelectState()).tokens, first.tokens)


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        TokenSelect(tokens=0)
    for bad in (1.5, -1.01):
        with pytest.raises(ValueError, match=r"threshold must be a cosine similarity in \[-1, 1\]"):
            TokenSelect(threshold=bad)
    with pytest.raises(ValueError, match="max_reuse must be >= 1"):
        TokenSelect(max_reuse=0)
    assert (TokenSelect().tokens, TokenSelect().threshold) == (2048, 0.9)
