"""Property tests of RowSet: per-(layer, kv-head) rows in the shared block pool.

A plain-Python model of every row (keys, values, positions, scores, in order) is kept next to the
RowSets; after every random append / write_scores / compact, ``gather`` must return exactly the
model, and block accounting must be exact (whole blocks, nothing leaked).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.errors import OutOfBlocksError
from longctx.kv.pool import BlockPool
from longctx.kv.rows import RowSet, table_width

SETTINGS = settings(max_examples=50, deadline=None)


def assert_host_tables_current(rs: RowSet) -> None:
    """Each layer's cached host block table (patched as rows grow and are cut) holds the block lists, padded."""
    for layer, heads in enumerate(rs.blocks):
        table = rs.block_table_np(layer)
        assert table.shape[0] == rs.num_kv_heads and table.shape[1] >= max(max(len(b) for b in heads), 1)
        for h, blocks in enumerate(heads):
            assert table[h, : len(blocks)].tolist() == blocks and (table[h, len(blocks):] == 0).all()


class Model:
    """What one RowSet should hold: per layer, per head, a list of (k [D], v [D], pos, score)."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.rows: list[list[list[tuple[torch.Tensor, torch.Tensor, int, float]]]] = [
            [[] for _ in range(num_heads)] for _ in range(num_layers)]
        self.next_pos = [0] * num_layers

    def lengths(self, layer: int) -> list[int]:
        return [len(r) for r in self.rows[layer]]


def assert_matches(rs: RowSet, model: Model) -> None:
    bs = rs.pool.block_size
    for layer in range(rs.num_layers):
        lengths = model.lengths(layer)
        assert rs.lengths[layer] == lengths
        view = rs.gather(layer)
        max_len = max(max(lengths), 1)
        assert view.k.shape == (rs.num_kv_heads, max_len, rs.pool.head_dim)
        assert view.lengths.tolist() == lengths
        for h, row in enumerate(model.rows[layer]):
            n = len(row)
            assert view.valid[h].tolist() == [True] * n + [False] * (max_len - n)
            if n:
                assert torch.equal(view.k[h, :n], torch.stack([t[0] for t in row]))
                assert torch.equal(view.v[h, :n], torch.stack([t[1] for t in row]))
                assert view.pos[h, :n].tolist() == [t[2] for t in row]
                assert view.score[h, :n].tolist() == [t[3] for t in row]
            # every row holds exactly the whole blocks its tokens need
            assert len(rs.blocks[layer][h]) == math.ceil(n / bs)
    expected_blocks = sum(math.ceil(n / bs) for layer in range(rs.num_layers) for n in model.lengths(layer))
    assert rs.num_blocks == expected_blocks
    assert rs.bytes_held() == rs.num_blocks * rs.pool.bytes_per_block
    assert sum(map(sum, rs.bytes_held_per_row())) == rs.bytes_held()
    assert rs.num_tokens() == sum(sum(model.lengths(layer)) for layer in range(rs.num_layers))


def append_random(rs: RowSet, model: Model, layer: int, n: int, g: torch.Generator) -> None:
    h, d = rs.num_kv_heads, rs.pool.head_dim
    k, v = torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g)
    start = model.next_pos[layer]
    pos = torch.arange(start, start + n) * 3 + 1  # any increasing original positions
    model.next_pos[layer] += n
    rs.append(layer, k, v, pos)
    for head in range(h):
        model.rows[layer][head] += [(k[i, head], v[i, head], int(pos[i]), 0.0) for i in range(n)]


@st.composite
def setups(draw: st.DrawFn) -> tuple[BlockPool, int, int]:
    pool = BlockPool(head_dim=draw(st.integers(1, 6)), block_size=draw(st.integers(1, 6)),
                     num_blocks=draw(st.integers(2, 5)), max_blocks=100_000)  # starts small: appends grow it
    return pool, draw(st.integers(1, 3)), draw(st.integers(1, 3))


@SETTINGS
@given(setup=setups(), data=st.data())
def test_random_appends_scores_and_compactions_gather_back_exactly(
        setup: tuple[BlockPool, int, int], data: st.DataObject) -> None:
    pool, num_layers, num_heads = setup
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    sets = [RowSet(pool, num_layers, num_heads) for _ in range(2)]  # two sequences share the pool
    models = [Model(num_layers, num_heads) for _ in sets]
    for _ in range(data.draw(st.integers(1, 14), label="steps")):
        i = data.draw(st.integers(0, 1), label="seq")
        rs, model = sets[i], models[i]
        layer = data.draw(st.integers(0, num_layers - 1), label="layer")
        op = data.draw(st.sampled_from(["append", "append", "scores", "compact", "reserve"]), label="op")
        if op == "append":
            append_random(rs, model, layer, data.draw(st.integers(0, 13), label="n"), g)
        elif op == "reserve":  # room for r tokens in every row first (patched into the cached host tables), then them
            r = data.draw(st.integers(1, 9), label="room")
            try:
                rs.reserve(r)
            except OutOfBlocksError:
                continue
            for lay in range(num_layers):
                append_random(rs, model, lay, r, g)
        elif op == "scores":
            view = rs.gather(layer)
            scores = torch.rand(view.valid.shape, generator=g)
            rs.write_scores(view, scores)
            for h, row in enumerate(model.rows[layer]):
                row[:] = [(k, v, p, float(scores[h, j])) for j, (k, v, p, _) in enumerate(row)]
        else:
            view = rs.gather(layer)
            keep = []
            for h, row in enumerate(model.rows[layer]):
                idx = sorted(data.draw(st.sets(st.integers(0, max(len(row) - 1, 0)), max_size=len(row)),
                                       label=f"keep{h}"))
                idx = [j for j in idx if j < len(row)]
                keep.append(torch.tensor(idx, dtype=torch.int64))
                row[:] = [row[j] for j in idx]
            bytes_before = rs.bytes_held()
            rs.compact(layer, view, keep)
            assert rs.bytes_held() <= bytes_before
        assert_matches(rs, model)
        assert_host_tables_current(rs)
        assert pool.num_used_blocks == sum(s.num_blocks for s in sets)
        pool.check_invariants()
    for rs, model in zip(sets, models, strict=True):
        assert_matches(rs, model)
        rs.release()
        assert rs.num_blocks == 0 and rs.bytes_held() == 0 and rs.num_tokens() == 0
        assert all(n == 0 for layer in rs.lengths for n in layer)
        pool.check_invariants()
    assert pool.num_used_blocks == 0


@SETTINGS
@given(setup=setups(), data=st.data())
def test_compact_keeps_exactly_the_chosen_indices_in_order_and_frees_blocks(
        setup: tuple[BlockPool, int, int], data: st.DataObject) -> None:
    pool, num_layers, num_heads = setup
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    rs, model = RowSet(pool, num_layers, num_heads), Model(num_layers, num_heads)
    layer = data.draw(st.integers(0, num_layers - 1), label="layer")
    for n in data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4), label="appends"):
        append_random(rs, model, layer, n, g)
    length = model.lengths(layer)[0]
    # a different number of tokens per head: rows of one layer end up with different lengths
    keep_sets = [sorted(data.draw(st.sets(st.integers(0, length - 1), max_size=length), label=f"keep{h}"))
                 for h in range(num_heads)]
    view = rs.gather(layer)
    blocks_before, bytes_before = rs.num_blocks, rs.bytes_held()
    rs.compact(layer, view, [torch.tensor(k, dtype=torch.int64) for k in keep_sets])
    after = rs.gather(layer)
    for h, keep in enumerate(keep_sets):
        n = len(keep)
        assert rs.lengths[layer][h] == n
        assert torch.equal(after.k[h, :n], view.k[h, keep]) and torch.equal(after.v[h, :n], view.v[h, keep])
        assert after.pos[h, :n].tolist() == view.pos[h, keep].tolist()
    bs = pool.block_size
    assert rs.num_blocks == sum(math.ceil(len(k) / bs) for k in keep_sets)
    assert pool.num_used_blocks == rs.num_blocks
    assert rs.bytes_held() == rs.num_blocks * pool.bytes_per_block
    if rs.num_blocks < blocks_before:
        assert rs.bytes_held() < bytes_before  # eviction returns real memory
    # rows keep working after compaction: appending lands after each row's own last token
    for h, row in enumerate(model.rows[layer]):
        row[:] = [row[j] for j in keep_sets[h]]
    append_random(rs, model, layer, data.draw(st.integers(1, 7), label="more"), g)
    assert_matches(rs, model)
    rs.release()
    assert pool.num_used_blocks == 0
    pool.check_invariants()


def test_rows_of_one_layer_can_have_different_lengths() -> None:
    pool = BlockPool(head_dim=2, block_size=4, num_blocks=4, max_blocks=64)
    rs, model = RowSet(pool, 2, 3), Model(2, 3)
    g = torch.Generator().manual_seed(0)
    append_random(rs, model, 0, 10, g)
    append_random(rs, model, 1, 5, g)
    view = rs.gather(0)
    keep = [torch.tensor([0]), torch.arange(10), torch.tensor([1, 4, 5, 9])]
    rs.compact(0, view, keep)
    for h, idx in enumerate(keep):
        model.rows[0][h] = [model.rows[0][h][j] for j in idx.tolist()]
    assert rs.lengths[0] == [1, 10, 4]
    append_random(rs, model, 0, 3, g)
    assert rs.lengths[0] == [4, 13, 7] and rs.lengths[1] == [5, 5, 5]
    assert_matches(rs, model)
    assert [len(b) for b in rs.blocks[0]] == [1, 4, 2]
    rs.release()
    assert pool.num_used_blocks == 0


def test_bytes_held_equals_blocks_times_block_bytes_and_shrinks_after_compaction() -> None:
    pool = BlockPool(head_dim=8, block_size=4, num_blocks=2, max_blocks=64, dtype=torch.float16)
    rs = RowSet(pool, num_layers=2, num_kv_heads=2)
    g = torch.Generator().manual_seed(1)
    for layer in range(2):
        rs.append(layer, torch.randn(17, 2, 8, generator=g), torch.randn(17, 2, 8, generator=g), torch.arange(17))
    assert pool.bytes_per_block == 2 * 4 * 8 * 2  # K and V, fp16
    assert rs.num_blocks == 2 * 2 * 5
    assert rs.bytes_held() == rs.num_blocks * pool.bytes_per_block
    assert rs.bytes_held_per_row() == [[5 * pool.bytes_per_block] * 2] * 2
    before = rs.bytes_held()
    rs.compact(1, rs.gather(1), [torch.arange(17)[-4:], torch.arange(9)])  # 4 tokens: 1 block, 9 tokens: 3
    assert rs.bytes_held_per_row() == [[5 * pool.bytes_per_block] * 2, [1 * pool.bytes_per_block,
                                                                        3 * pool.bytes_per_block]]
    assert rs.bytes_held() == rs.num_blocks * pool.bytes_per_block == before - 6 * pool.bytes_per_block
    assert pool.num_used_blocks == rs.num_blocks
    rs.release()
    assert rs.bytes_held() == 0 and pool.num_used_blocks == 0


def test_gather_of_an_empty_layer_is_all_padding() -> None:
    pool = BlockPool(head_dim=4, block_size=4)
    rs = RowSet(pool, 1, 2)
    view = rs.gather(0)
    assert view.lengths.tolist() == [0, 0] and not view.valid.any()
    assert rs.num_blocks == 0 and rs.bytes_held() == 0


def test_append_that_runs_out_of_blocks_raises_and_release_still_returns_every_block() -> None:
    pool = BlockPool(head_dim=2, block_size=2, num_blocks=2, max_blocks=8)  # 7 usable blocks
    rs, model = RowSet(pool, 1, 2), Model(1, 2)
    g = torch.Generator().manual_seed(2)
    append_random(rs, model, 0, 6, g)  # 2 rows x 3 blocks
    with pytest.raises(OutOfBlocksError, match="exhausted"):
        rs.append(0, torch.randn(4, 2, 2, generator=g), torch.randn(4, 2, 2, generator=g), torch.arange(4))
    pool.check_invariants()
    view = rs.gather(0)  # what was stored before the failed append is intact
    assert rs.lengths[0] == [6, 6]
    for h in range(2):
        assert torch.equal(view.k[h, :6], torch.stack([t[0] for t in model.rows[0][h]]))
    rs.release()
    assert pool.num_used_blocks == 0
    pool.check_invariants()


def test_growth_patches_the_cached_host_table_instead_of_rebuilding_it() -> None:
    pool = BlockPool(head_dim=4, block_size=4, num_blocks=64)
    rs = RowSet(pool, num_layers=2, num_kv_heads=2)
    for layer in range(2):
        rs.append(layer, torch.randn(8, 2, 4), torch.randn(8, 2, 4), torch.arange(8))
    tables = [rs.block_table_np(layer) for layer in range(2)]
    rs.reserve(1)  # every row is full: one new block each, a wider table
    rs.append(0, torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.tensor([8]))
    assert_host_tables_current(rs)
    grown = rs.block_table_np(1)
    assert grown is not tables[1] and grown.shape[1] == table_width(3) == 16  # widened to a power of two
    rs.reserve(2)  # room already there for 2 more in layer 1: no change, the same cached table
    assert rs.block_table_np(1) is grown
    rs.reserve(5)  # two more blocks per row of layer 1, within the padding: patched in place
    assert rs.block_table_np(1) is grown and [len(b) for b in rs.blocks[1]] == [4, 4]
    assert_host_tables_current(rs)
