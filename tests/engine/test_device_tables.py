"""Host work of a batched decode step on CPU: ``prepare_decode`` and the incrementally patched
``DeviceTables`` must always describe the host rows (block lists, lengths) exactly, and
``RowSet.extend_for_decode`` must report exactly the blocks it adds."""

from __future__ import annotations

import math

import torch

from longctx.bench.sweep import shape_config
from longctx.engine.fast_decode import DeviceTables, prepare_decode
from longctx.kv.pool import BlockPool
from longctx.kv.rows import RowSet
from longctx.kv.sequence import SequenceKV
from longctx.kv.spec import KVSpec

CPU = torch.device("cpu")
BS = 4


def _cfg():  # noqa: ANN202
    return shape_config("tiny", 4096)  # 2 layers, 2 kv heads


def _pool(cfg) -> BlockPool:  # noqa: ANN001
    return BlockPool(cfg.head_dim, block_size=BS, num_blocks=8, max_blocks=100_000)


def _seq(pool: BlockPool, cfg, lengths: list[list[int]]) -> SequenceKV:  # noqa: ANN001
    """A full-cache sequence whose rows hold exactly the blocks their lengths need."""
    longest = max(max(x) for x in lengths)
    seq = SequenceKV(pool, cfg, KVSpec.parse("full"), longest)
    rows = seq.rows
    rows.extend_for_decode(longest)
    for layer, heads in enumerate(lengths):
        for h, n in enumerate(heads):
            need = math.ceil(n / BS)
            pool.free(rows.blocks[layer][h][need:])
            del rows.blocks[layer][h][need:]
    rows.lengths = [list(x) for x in lengths]
    return seq


def _finish(seqs: list[SequenceKV]) -> None:
    """What FastDecodeContext.finish does to the host rows."""
    for seq in seqs:
        seq.rows.lengths = [[n + 1 for n in ln] for ln in seq.rows.lengths]


def _expected_capacity(blocks: int) -> int:
    return max(16, 1 << (max(blocks, 1) - 1).bit_length())


def _check(meta, seqs: list[SequenceKV], before: list[list[list[int]]], positions: list[int]) -> None:  # noqa: ANN001
    """meta describes the host rows; ``before`` are the host lengths before the step."""
    num_layers, num_heads = seqs[0].rows.num_layers, seqs[0].rows.num_kv_heads
    bsz = len(seqs)
    longest = max(len(b) for s in seqs for layer in s.rows.blocks for b in layer)
    cap = meta.block_tables.shape[-1]
    assert meta.block_tables.shape == (num_layers, bsz, num_heads, cap) and cap >= longest
    assert cap & (cap - 1) == 0 and cap >= 16
    assert meta.block_tables.dtype == torch.int32 and meta.context_lens.dtype == torch.int32
    assert meta.slot_mapping.dtype == torch.int64 and meta.positions.dtype == torch.int64
    assert meta.context_lens.shape == (num_layers, bsz, num_heads)
    assert meta.slot_mapping.shape == (num_layers, bsz * num_heads)
    assert meta.positions.tolist() == positions and meta.host_positions == positions
    for b, seq in enumerate(seqs):
        for layer in range(num_layers):
            for h in range(num_heads):
                blocks = seq.rows.blocks[layer][h]
                n = before[b][layer][h]
                assert len(blocks) * BS >= n + 1, "no room for the new token"
                assert meta.block_tables[layer, b, h, : len(blocks)].tolist() == blocks, (b, layer, h)
                assert not meta.block_tables[layer, b, h, len(blocks):].any()  # padding: the null block
                assert int(meta.context_lens[layer, b, h]) == n + 1
                assert int(meta.slot_mapping[layer, b * num_heads + h]) == blocks[n // BS] * BS + n % BS


def _step(seqs: list[SequenceKV], positions: list[int]):  # noqa: ANN202
    before = [[list(x) for x in s.rows.lengths] for s in seqs]
    meta = prepare_decode(seqs, positions, CPU)
    _check(meta, seqs, before, positions)
    # the block tables of one step are views of the sequence's device table, patched in place by later steps
    snapshot = (meta.block_tables.clone(), meta.context_lens.clone(), meta.slot_mapping.clone())
    _finish(seqs)
    return meta, snapshot


def test_decode_steps_track_host_rows_and_grow_capacity() -> None:
    cfg = _cfg()
    pool = _pool(cfg)
    # rows of different lengths; row (1, 0) sits just below 16 full blocks, row (0, 1) at a block boundary
    seq = _seq(pool, cfg, [[50, 48], [63, 33]])
    caps, history = [], []
    slots_seen = set()
    for step in range(30):
        pos = 1000 + step
        before_blocks = [[list(b) for b in layer] for layer in seq.rows.blocks]
        meta, snap = _step([seq], [pos])
        caps.append(meta.block_tables.shape[-1])
        longest = max(len(b) for layer in seq.rows.blocks for b in layer)
        assert caps[-1] == _expected_capacity(longest)
        # blocks only ever get appended: earlier entries of every row are preserved
        for layer in range(2):
            for h in range(2):
                assert seq.rows.blocks[layer][h][: len(before_blocks[layer][h])] == before_blocks[layer][h]
        history.append(snap)
        new_slots = set(snap[2].reshape(-1).tolist())
        assert not (new_slots & slots_seen), "a slot was handed out twice"
        slots_seen |= new_slots
    assert caps[0] == 16 and caps[-1] == 32  # row (1, 0) crossed 16 blocks (64 tokens) at step 1
    assert caps.index(32) == 1
    assert seq.rows.lengths == [[80, 78], [93, 63]]
    # every token slot of every row was written exactly once by the decode steps, in order
    for layer in range(2):
        for h in range(2):
            start = [[50, 48], [63, 33]][layer][h]
            blocks = seq.rows.blocks[layer][h]
            expected = [blocks[n // BS] * BS + n % BS for n in range(start, start + 30)]
            got = [int(s[2][layer, h]) for s in history]
            assert got == expected
    assert isinstance(seq.device_tables, DeviceTables)
    assert seq.device_tables.version == seq.rows.version
    pool.check_invariants()


def test_external_length_change_with_version_bump_is_picked_up() -> None:
    cfg = _cfg()
    pool = _pool(cfg)
    seq = _seq(pool, cfg, [[20, 21], [22, 23]])
    for i in range(3):
        _step([seq], [100 + i])
    # eviction-like change: row (0, 1) shrinks to 9 tokens and gives back its surplus blocks
    rows = seq.rows
    rows.lengths[0][1] = 9
    pool.free(rows.blocks[0][1][3:])
    del rows.blocks[0][1][3:]
    rows.mark_changed(0)  # what compaction does
    meta, _ = _step([seq], [103])
    assert int(meta.context_lens[0, 0, 1]) == 10
    assert meta.block_tables[0, 0, 1, 3:].tolist() == [0] * (meta.block_tables.shape[-1] - 3)
    for i in range(6):
        _step([seq], [104 + i])
    assert rows.lengths == [[30, 16], [32, 33]]
    pool.check_invariants()


def test_external_length_change_without_version_bump_is_picked_up() -> None:
    """Tokens fed by another path (host lengths not what the device lengths predict) re-upload the lengths."""
    cfg = _cfg()
    pool = _pool(cfg)
    seq = _seq(pool, cfg, [[10, 12], [7, 15]])
    _step([seq], [0])
    _step([seq], [1])
    seq.rows.lengths[1][0] -= 3  # blocks untouched: still room
    _step([seq], [2])  # _check compares with the host lengths
    # two tokens appended through the per-sequence path (RowSet.append, as prefill does)
    g = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_layers):
        k = torch.randn(2, cfg.num_kv_heads, cfg.head_dim, generator=g)
        seq.rows.append(layer, k, k.clone(), torch.tensor([50, 51]))
    for i in range(5):
        _step([seq], [3 + i])
    assert seq.rows.lengths == [[20, 22], [14, 25]]


def test_two_sequences_of_different_lengths_stack_padded() -> None:
    cfg = _cfg()
    pool = _pool(cfg)
    short = _seq(pool, cfg, [[5, 3], [6, 1]])
    long = _seq(pool, cfg, [[70, 66], [80, 75]])  # 20 blocks: capacity 32
    for i in range(12):
        meta, snap = _step([short, long], [7 + i, 90 + i])
        assert meta.block_tables.shape[-1] == 32
        assert short.device_tables.table.shape[-1] == 16 and long.device_tables.table.shape[-1] == 32
        # each sequence's slots are its own rows' slots
        for b, seq in enumerate((short, long)):
            for layer in range(2):
                for h in range(2):
                    n = seq.rows.lengths[layer][h] - 1
                    blocks = seq.rows.blocks[layer][h]
                    assert int(snap[2][layer, b * 2 + h]) == blocks[n // BS] * BS + n % BS
    # then one alone: its own capacity again
    meta, _ = _step([short], [100])
    assert meta.block_tables.shape == (2, 1, 2, 16)
    # order within the batch does not matter
    _step([long, short], [200, 101])
    pool.check_invariants()


def test_new_sequence_in_batch_and_release() -> None:
    cfg = _cfg()
    pool = _pool(cfg)
    a = _seq(pool, cfg, [[9, 9], [9, 9]])
    for i in range(3):
        _step([a], [i])
    b = _seq(pool, cfg, [[4, 4], [4, 4]])
    for i in range(5):
        _step([a, b], [3 + i, 10 + i])
    a.rows.release()
    c = _seq(pool, cfg, [[1, 2], [3, 4]])  # may reuse a's blocks
    for i in range(5):
        _step([b, c], [20 + i, 30 + i])
    pool.check_invariants()


# ---- RowSet.extend_for_decode --------------------------------------------------------------------------------
def _rows(lengths: list[list[int]], bs: int = BS) -> RowSet:
    pool = BlockPool(head_dim=2, block_size=bs, num_blocks=4, max_blocks=10_000)
    rs = RowSet(pool, len(lengths), len(lengths[0]))
    for layer, heads in enumerate(lengths):
        for h, n in enumerate(heads):
            rs.blocks[layer][h] = pool.allocate(math.ceil(n / bs))
    rs.lengths = [list(x) for x in lengths]
    return rs


def test_extend_for_decode_no_new_blocks_when_every_row_has_room() -> None:
    rs = _rows([[1, 5, 6], [3, 7, 2]])
    blocks = [[list(b) for b in layer] for layer in rs.blocks]
    version = rs.version
    assert rs.extend_for_decode(1) == []
    assert rs.blocks == blocks and rs.version == version
    assert rs.extend_for_decode(0) == []


def test_extend_for_decode_reports_added_blocks() -> None:
    # layer 0: row 0 full (8 tokens in 2 blocks), row 1 has room, row 2 empty (no block yet)
    # layer 1: row 1 full (4 tokens, 1 block)
    rs = _rows([[8, 5, 0], [2, 4, 3]])
    version = rs.version
    used = rs.pool.num_used_blocks
    added = rs.extend_for_decode(1)
    assert rs.version == version
    assert [(a[0], a[1], a[2]) for a in added] == [(0, 0, 2), (0, 2, 0), (1, 1, 1)]
    for layer, h, i, block in added:
        assert rs.blocks[layer][h][i] == block
        assert rs.pool.ref_cnt[block] == 1
    assert len({a[3] for a in added}) == 3
    assert rs.pool.num_used_blocks == used + 3
    assert [len(b) for b in rs.blocks[0]] == [3, 2, 1] and [len(b) for b in rs.blocks[1]] == [1, 2, 1]
    assert rs.lengths == [[8, 5, 0], [2, 4, 3]]  # lengths are the caller's business
    assert rs.extend_for_decode(1) == []  # idempotent until the lengths move
    rs.pool.check_invariants()


def test_extend_for_decode_several_tokens() -> None:
    rs = _rows([[4, 1]], bs=4)
    added = rs.extend_for_decode(9)  # row 0 needs 13 tokens = 4 blocks (3 new), row 1 10 tokens = 3 (2 new)
    assert [(a[0], a[1], a[2]) for a in added] == [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 1), (0, 1, 2)]
    assert [len(b) for b in rs.blocks[0]] == [4, 3]
    for layer, h, i, block in added:
        assert rs.blocks[layer][h][i] == block
    rs.pool.check_invariants()
