"""Quest: the page bound is an upper bound on q·k, the selection keeps sink and newest pages and the top bounds
(ties to the earlier page), pages of several blocks, and block summaries equal a direct computation."""

from __future__ import annotations

import pytest
import torch

from longctx.engine.fast_decode import paged_decode_torch
from longctx.errors import SpecError
from longctx.kv.select.attend import attend_selection, blocks_to_tokens, dense_as_paged
from longctx.kv.select.base import SelectState, row_token_count
from longctx.kv.select.quest import Quest
from longctx.kv.select.summaries import (
    block_summaries_dense,
    ensure_summaries,
    last_slots,
    refresh_rows,
    update_written,
)
from longctx.kv.spec import KVSpec


def _rows(h: int = 2, length: int = 100, d: int = 8, bs: int = 16, seed: int = 0, lengths=None):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(h, length, d, generator=g), torch.randn(h, length, d, generator=g)
    lens = torch.tensor(lengths or [length] * h)
    return dense_as_paged(k, v, torch.arange(length).repeat(h, 1), lens, bs, summaries=True), k


def test_page_bound_is_an_upper_bound_of_every_key_in_the_page() -> None:
    rows, k = _rows(h=1, length=64, d=16)
    q = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3))
    s = rows.summaries
    bound = q[0, 0].clamp(min=0) @ s[:, 1].T + q[0, 0].clamp(max=0) @ s[:, 0].T  # [blocks]
    dots = (k[0] @ q[0, 0]).view(4, 16)
    assert torch.all(dots.amax(1) <= bound + 1e-5)


def test_selection_keeps_sink_newest_and_top_bounds() -> None:
    d, bs = 4, 4
    k = torch.zeros(1, 32, d)
    k[0, 12:16, 0] = 5.0  # block 3 has a large key along q
    k[0, 20:24, 0] = 3.0  # block 5 next
    rows = dense_as_paged(k, k.clone(), torch.arange(32)[None], torch.tensor([30]), bs, summaries=True)
    q = torch.tensor([[[1.0, 0, 0, 0]]])
    sel = Quest(page=4, pages=3, dense_layers=0).select(0, q, rows, SelectState())
    assert sel is not None and sel.blocks[0, 0, : int(sel.num_blocks[0, 0])].tolist() == [0, 3, 7]  # in index order
    sel = Quest(page=4, pages=4, dense_layers=0).select(0, q, rows, SelectState())
    assert sorted(sel.blocks[0, 0, :4].tolist()) == [0, 3, 5, 7]
    assert row_token_count(rows, sel).tolist() == [[4 + 4 + 4 + 2]]  # the newest block holds 2 of its 4


def test_ties_go_to_the_earlier_page() -> None:
    k = torch.ones(1, 64, 4)
    rows = dense_as_paged(k, k.clone(), torch.arange(64)[None], torch.tensor([64]), 8, summaries=True)
    sel = Quest(page=8, pages=4, dense_layers=0).select(0, torch.ones(1, 1, 4), rows, SelectState())
    assert sel.blocks[0, 0, :4].tolist() == [0, 1, 2, 7]


def test_pages_of_several_blocks_cover_their_blocks() -> None:
    rows, _ = _rows(h=2, length=96, d=8, bs=8)
    q = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    sel = Quest(page=16, pages=3, dense_layers=0).select(0, q, rows, SelectState())
    blocks = sel.blocks[0, :, :6].view(2, 3, 2)
    assert torch.equal(blocks[..., 1], blocks[..., 0] + 1) and torch.all(blocks[..., 0] % 2 == 0)
    assert sel.num_blocks.tolist() == [[6, 6]]
    with pytest.raises(ValueError, match="multiple of the KV block size"):
        Quest(page=12, pages=3, dense_layers=0).select(0, q, rows, SelectState())


@pytest.mark.parametrize("tokens", [16, 48, 1000])
def test_block_and_token_paths_agree(tokens: int) -> None:
    rows, _ = _rows(h=2, length=90, lengths=[90, 41])
    q = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(2))
    sel = Quest(tokens=tokens, dense_layers=0).select(0, q, rows, SelectState())
    out = attend_selection(q, rows, sel, 0.3, None, paged_decode_torch)
    if sel is None:
        assert torch.equal(out, paged_decode_torch(q, rows.k, rows.v, rows.block_tables, rows.lengths, 0.3))
        return
    tok = blocks_to_tokens(rows, sel)
    ref = torch.zeros_like(q)
    for h in range(2):  # direct: softmax over the selected tokens of each row
        t = tok[0, h][tok[0, h] >= 0]
        kk, vv = rows.k.reshape(-1, 8)[rows.block_tables[0, h][t // 16] * 16 + t % 16], None
        vv = rows.v.reshape(-1, 8)[rows.block_tables[0, h][t // 16] * 16 + t % 16]
        ref[0, 3 * h : 3 * h + 3] = torch.softmax(q[0, 3 * h : 3 * h + 3] @ kk.T * 0.3, -1) @ vv
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_layers_and_covering_budgets_read_everything() -> None:
    rows, _ = _rows()
    q = torch.randn(1, 2, 8)
    assert Quest(tokens=16).select(1, q, rows, SelectState()) is None  # the first two layers are dense
    assert Quest(tokens=10_000, dense_layers=0).select(5, q, rows, SelectState()) is None


def test_summaries_dense_update_and_refresh_agree() -> None:
    from longctx.kv.pool import BlockPool  # noqa: PLC0415

    pool = BlockPool(head_dim=8, block_size=4, num_blocks=16)
    pool.k.copy_(torch.randn(pool.k.shape, generator=torch.Generator().manual_seed(5)))
    ensure_summaries(pool)
    tables = torch.tensor([[[3, 7, 2, 0]], [[5, 9, 0, 0]]])  # [L=2, H=1, cap]
    lengths = torch.tensor([[10], [5]])
    refresh_rows(pool, tables, lengths)
    direct = block_summaries_dense(pool.k[torch.tensor([3, 7, 2, 5, 9])], torch.tensor([4, 4, 2, 4, 1]))
    assert torch.equal(pool.summary[torch.tensor([3, 7, 2, 5, 9])], direct)
    assert torch.equal(pool.summary[0], torch.zeros(2, 8))
    pool.k[2, 2] = 100.0  # the third token of block 2 arrives (slot 2 * 4 + 2)
    update_written(pool, torch.tensor([10]))
    assert pool.summary[2, 1].max() == 100.0
    assert torch.equal(pool.summary[2], block_summaries_dense(pool.k[2:3], torch.tensor([3]))[0])


def test_last_slots_name_each_blocks_last_token_and_the_null_block_past_the_row() -> None:
    tables = torch.tensor([[[3, 7, 2, 0]], [[5, 9, 0, 0]]])  # [L=2, H=1, cap], block size 4
    got = last_slots(tables, torch.tensor([[10], [5]]), 4)
    assert got.tolist() == [3 * 4 + 3, 7 * 4 + 3, 2 * 4 + 1, 0, 5 * 4 + 3, 9 * 4 + 0, 0, 0]


def test_bad_parameters_and_incompatible_positions_are_refused() -> None:
    for text, msg in [("select=quest(tokens=0)", "tokens must be >= 1"), ("select=quest(pages=1)", "pages must be"),
                      ("select=quest(page=0)", "page must be >= 1"),
                      ("select=quest positions=self_extend", "stores raw keys")]:
        with pytest.raises(SpecError, match=msg):
            KVSpec.parse(text)


@pytest.mark.parametrize("page", [16, 32])
def test_fast_token_count_equals_the_measured_one(page: int) -> None:
    rows, _ = _rows(h=3, length=200, lengths=[200, 77, 31])
    q = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(8))
    for tokens in (32, 64, 100):
        policy = Quest(page=page, tokens=tokens, dense_layers=0)
        sel = policy.select(0, q, rows, SelectState())
        assert torch.equal(policy.tokens_read(rows, sel), row_token_count(rows, sel))


def test_top_indices_break_ties_to_the_lower_index_like_a_stable_sort() -> None:
    from longctx.kv.select.quest import top_indices  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randint(-4, 4, (2, 3, 40), generator=g).float()
        x[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), -0.0])
        assert torch.equal(top_indices(x, 11), torch.sort(x, descending=True, stable=True).indices[..., :11])
