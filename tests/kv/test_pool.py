"""Property tests of the KV block pool: allocation bookkeeping, growth and its cap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.errors import LongctxError, OutOfBlocksError
from longctx.kv.pool import NULL_BLOCK, BlockPool

SETTINGS = settings(max_examples=50, deadline=None)


def pools() -> st.SearchStrategy[BlockPool]:
    return st.builds(
        lambda bs, d, n, extra: BlockPool(d, block_size=bs, num_blocks=n, max_blocks=n + extra),
        st.integers(1, 8), st.integers(1, 8), st.integers(2, 9), st.integers(0, 40),
    )


def assert_consistent(pool: BlockPool, held: list[int]) -> None:
    """``held``: every block handed out and not yet freed (the test's model of the pool)."""
    pool.check_invariants()
    assert len(pool.free_blocks) + pool.num_used_blocks + 1 == pool.num_blocks  # free + used + null == total
    assert pool.num_used_blocks == len(held)
    assert len(set(held)) == len(held), "a block was handed out twice"
    assert NULL_BLOCK not in held
    assert all(0 < b < pool.num_blocks for b in held)
    assert not set(held) & set(pool.free_blocks)
    assert pool.num_free_blocks == pool.max_blocks - 1 - len(held)
    assert pool.num_blocks <= pool.max_blocks
    assert pool.peak_used_blocks >= pool.num_used_blocks


@SETTINGS
@given(pool=pools(), data=st.data())
def test_random_allocate_and_free_keep_the_invariants(pool: BlockPool, data: st.DataObject) -> None:
    allocations: list[list[int]] = []
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        held = [b for a in allocations for b in a]
        if allocations and data.draw(st.booleans(), label="free?"):
            victim = allocations.pop(data.draw(st.integers(0, len(allocations) - 1), label="which"))
            pool.free(victim)
        else:
            n = data.draw(st.integers(0, 12), label="n")
            if pool.can_allocate(n):
                got = pool.allocate(n)
                assert len(got) == n
                allocations.append(got)
            else:
                before = (pool.num_blocks, list(pool.free_blocks), list(pool.ref_cnt))
                with pytest.raises(OutOfBlocksError):
                    pool.allocate(n)
                assert (pool.num_blocks, pool.free_blocks, pool.ref_cnt) == before, "a failed allocate changed state"
        held = [b for a in allocations for b in a]
        assert_consistent(pool, held)
    for a in allocations:
        pool.free(a)
    assert_consistent(pool, [])
    assert pool.num_used_blocks == 0


@SETTINGS
@given(pool=pools(), data=st.data())
def test_double_free_raises_and_leaves_the_pool_consistent(pool: BlockPool, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, pool.max_blocks - 1), label="n")
    blocks = pool.allocate(n)
    victim = data.draw(st.sampled_from(blocks), label="victim")
    pool.free([victim])
    with pytest.raises(RuntimeError, match=f"double free of block {victim}"):
        pool.free([victim])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([NULL_BLOCK])
    rest = [b for b in blocks if b != victim]
    assert_consistent(pool, rest)
    pool.free(rest)
    assert_consistent(pool, [])


@SETTINGS
@given(pool=pools(), data=st.data())
def test_allocating_beyond_max_blocks_raises_out_of_blocks_with_a_helpful_message(
        pool: BlockPool, data: st.DataObject) -> None:
    capacity = pool.max_blocks - 1  # the null block is never handed out
    first = data.draw(st.integers(0, capacity), label="first")
    held = pool.allocate(first)
    assert pool.can_allocate(capacity - first)
    assert not pool.can_allocate(capacity - first + 1)
    too_many = data.draw(st.integers(capacity - first + 1, capacity + 5), label="too_many")
    with pytest.raises(OutOfBlocksError) as exc:
        pool.allocate(too_many)
    assert isinstance(exc.value, LongctxError)  # reported to the user without a traceback
    msg = str(exc.value)
    assert "exhausted" in msg and f"{pool.max_blocks} blocks" in msg and f"{pool.block_size} tokens" in msg
    assert "--kv-memory" in msg  # says how to fix it
    assert_consistent(pool, held)
    held += pool.allocate(capacity - first)  # exactly filling the pool still works
    assert_consistent(pool, held)
    assert pool.num_free_blocks == 0 and pool.num_blocks == pool.max_blocks
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)


@SETTINGS
@given(pool=pools(), data=st.data())
def test_growth_preserves_existing_block_contents(pool: BlockPool, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    written: dict[int, tuple[torch.Tensor, ...]] = {}
    held: list[int] = []
    while pool.num_free_blocks:
        n = data.draw(st.integers(1, min(pool.num_free_blocks, 10)), label="n")
        size_before = pool.num_blocks
        new = pool.allocate(n)
        held += new
        if pool.num_blocks > size_before:  # grew: nothing written before may have moved or changed
            assert pool.num_blocks <= pool.max_blocks
            for b, (k, v, pos, score) in written.items():
                assert torch.equal(pool.k[b], k) and torch.equal(pool.v[b], v)
                assert torch.equal(pool.pos[b], pos) and torch.equal(pool.score[b], score)
        for b in new:
            shape = (pool.block_size, pool.head_dim)
            vals = (torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                    torch.randint(0, 10**6, (pool.block_size,), generator=g), torch.rand(pool.block_size, generator=g))
            pool.k[b], pool.v[b], pool.pos[b], pool.score[b] = vals
            written[b] = vals
        assert_consistent(pool, held)
    assert pool.num_blocks == pool.max_blocks
    for b, (k, v, pos, score) in written.items():
        assert torch.equal(pool.k[b], k) and torch.equal(pool.v[b], v)
        assert torch.equal(pool.pos[b], pos) and torch.equal(pool.score[b], score)


def test_new_blocks_come_from_growth_only_when_the_free_list_is_empty() -> None:
    pool = BlockPool(4, block_size=2, num_blocks=4, max_blocks=10)
    a = pool.allocate(3)
    assert pool.num_blocks == 4 and sorted(a) == [1, 2, 3]
    b = pool.allocate(2)
    assert pool.num_blocks == 8 and not set(a) & set(b)  # doubled
    c = pool.allocate(4)
    assert pool.num_blocks == 10 and len(set(a + b + c)) == 10 - 1
    assert pool.bytes_per_block == 2 * 2 * 4 * 4


def test_invalid_pool_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(4, num_blocks=1)
