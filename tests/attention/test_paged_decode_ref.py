"""The paged decode reference equals dense attention over each row's gathered tokens (fp64, naive)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from longctx.attention.triton.paged_decode import paged_decode_attention, paged_decode_attention_ref


def make_rows(batch: int, num_kv_heads: int, group: int, block_size: int, lengths: list[int], seed: int = 0,
              head_dim: int = 16) -> dict:
    """Random q and pool; each row's blocks drawn from a shuffled permutation; table tails hold garbage ids."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int32).view(batch, num_kv_heads)
    nblocks = [(n + block_size - 1) // block_size for n in lengths]
    num_blocks = sum(nblocks) + 4
    width = max(max(nblocks), 1)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.randint(0, num_blocks, (batch * num_kv_heads, width), generator=g, dtype=torch.int32)
    for r, n in enumerate(nblocks):
        tables[r, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        del ids[:n]
    return {
        "q": torch.randn(batch, num_kv_heads * group, head_dim, generator=g),
        "k_pool": torch.randn(num_blocks, block_size, head_dim, generator=g),
        "v_pool": torch.randn(num_blocks, block_size, head_dim, generator=g),
        "block_tables": tables.view(batch, num_kv_heads, width),
        "lengths": lens,
    }


def dense_attention(rows: dict, scale: float, softcap: float | None = None,
                    tokens: dict[tuple[int, int], list[int]] | None = None) -> torch.Tensor:
    """fp64 softmax(q k^T * scale) v per query head over the row's tokens (all < length, or ``tokens[(b, h)]``)."""
    q, k_pool, v_pool, tables, lens = (rows[n] for n in ("q", "k_pool", "v_pool", "block_tables", "lengths"))
    batch, num_heads, d = q.shape
    num_kv_heads, bs = tables.shape[1], k_pool.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, num_heads, d, dtype=torch.float64)
    for b in range(batch):
        for j in range(num_heads):
            h = j // group
            idx = tokens[(b, h)] if tokens is not None else list(range(int(lens[b, h])))
            if not idx:
                continue
            k = torch.stack([k_pool[tables[b, h, i // bs], i % bs] for i in idx]).double()  # [n, D]
            v = torch.stack([v_pool[tables[b, h, i // bs], i % bs] for i in idx]).double()
            s = k @ q[b, j].double() * scale  # [n]
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[b, j] = torch.softmax(s, dim=0) @ v
    return out


def ref(rows: dict, scale: float, **kw) -> torch.Tensor:
    return paged_decode_attention_ref(rows["q"], rows["k_pool"], rows["v_pool"], rows["block_tables"],
                                      rows["lengths"], scale, **kw)


@pytest.mark.parametrize(("batch", "num_kv_heads", "group", "block_size", "lengths"), [
    (1, 1, 1, 4, [1]),
    (1, 2, 4, 4, [9, 8]),  # block boundary and one past it
    (2, 2, 2, 8, [17, 0, 1, 31]),
    (3, 1, 8, 16, [40, 16, 5]),
    (2, 4, 1, 4, [3, 12, 0, 7, 25, 1, 4, 13]),
])
def test_ref_matches_dense_attention_on_ragged_rows(batch, num_kv_heads, group, block_size, lengths) -> None:  # noqa: ANN001
    rows = make_rows(batch, num_kv_heads, group, block_size, lengths, seed=len(lengths))
    out = ref(rows, 0.25)
    assert out.dtype == torch.float32 and out.shape == rows["q"].shape
    assert (out.double() - dense_attention(rows, 0.25)).abs().max() < 1e-5


def test_ref_gives_zeros_for_rows_without_tokens() -> None:
    rows = make_rows(2, 2, 3, 4, [0, 6, 5, 0])
    out = ref(rows, 0.3)
    assert (out[0, :3] == 0).all() and (out[1, 3:] == 0).all()
    assert (out[0, 3:] != 0).all() and (out[1, :3] != 0).all()


def test_ref_applies_softcap_to_scaled_logits() -> None:
    rows = make_rows(2, 2, 2, 8, [20, 13, 1, 9], seed=3)
    capped = ref(rows, 1.0, softcap=2.0)
    assert (capped.double() - dense_attention(rows, 1.0, softcap=2.0)).abs().max() < 1e-5
    assert (capped - ref(rows, 1.0)).abs().max() > 1e-2  # the cap matters at this scale


def test_ref_keeps_input_dtype_and_computes_in_fp32() -> None:
    rows = make_rows(1, 2, 2, 4, [10, 7], seed=5)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in rows.items()}
    out = ref(half, 0.25)
    assert out.dtype == torch.bfloat16
    dense = dense_attention(half, 0.25)  # the same bf16 inputs, exact arithmetic
    assert (out.double() - dense).abs().max() < 1e-2


def test_ref_selected_blocks_equal_dense_attention_over_those_tokens() -> None:
    bs = 4
    lengths = [10, 0, 7, 13]  # rows have 3, 0, 2, 4 blocks
    rows = make_rows(2, 2, 3, bs, lengths, seed=7)
    # (b, h) -> selected indices into the row's table: unsorted, with the partial last block, a past-the-end index
    picks = {(0, 0): [2, 0], (0, 1): [], (1, 0): [1, 5], (1, 1): [3, 1, 2, 0]}
    max_sel = 5
    sel = torch.full((2, 2, max_sel), 99, dtype=torch.int32)  # entries past num_selected: garbage, never read
    num = torch.zeros(2, 2, dtype=torch.int32)
    for (b, h), p in picks.items():
        sel[b, h, : len(p)] = torch.tensor(p, dtype=torch.int32)
        num[b, h] = len(p)
    tokens = {(b, h): [i for blk in p for i in range(blk * bs, blk * bs + bs) if i < lengths[2 * b + h]]
              for (b, h), p in picks.items()}
    out = ref(rows, 0.4, selected_blocks=sel, num_selected=num)
    assert (out.double() - dense_attention(rows, 0.4, tokens=tokens)).abs().max() < 1e-5
    assert (out[0, 3:] == 0).all()


def test_ref_selecting_every_block_equals_full_attention() -> None:
    rows = make_rows(2, 2, 2, 4, [10, 3, 16, 1], seed=11)
    width = rows["block_tables"].shape[2]
    sel = torch.arange(width, dtype=torch.int32).expand(2, 2, width).contiguous()
    num = (rows["lengths"] + 3) // 4
    assert torch.equal(ref(rows, 0.3, selected_blocks=sel, num_selected=num), ref(rows, 0.3))


def test_ref_ignores_table_entries_past_a_row() -> None:
    rows = make_rows(1, 2, 2, 4, [5, 2], seed=13)
    other = dict(rows, block_tables=rows["block_tables"].clone())
    other["block_tables"][0, 0, 2:] = 0
    other["block_tables"][0, 1, 1:] = 0
    assert torch.equal(ref(rows, 0.5), ref(other, 0.5))


def test_module_imports_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import longctx, longctx.attention.triton.check\n"
        "from longctx.attention.triton import paged_decode as m\n"
        "assert not m.HAS_TRITON\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_wrapper_raises_clear_error_without_triton_or_cuda() -> None:
    rows = make_rows(1, 2, 2, 4, [5, 2])
    with pytest.raises(RuntimeError, match="Triton|CUDA"):
        paged_decode_attention(*rows.values(), 0.5)


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(block_tables=r["block_tables"].long()), "block_tables must be int32"),
    (lambda r: r.update(lengths=r["lengths"].long()), "lengths must be int32"),
    (lambda r: r.update(lengths=r["lengths"][:, :1]), "lengths must be"),
    (lambda r: r.update(q=r["q"][:, :3]), "not a multiple"),
    (lambda r: r.update(k_pool=r["k_pool"].half()), "share one dtype"),
    (lambda r: r.update(v_pool=r["v_pool"][:, :2]), "disagree"),
    (lambda r: r.update(q=r["q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    (lambda r: r.update(block_tables=r["block_tables"][0]), "block_tables must be"),
])
def test_kernel_wrapper_rejects_bad_arguments(change, message) -> None:  # noqa: ANN001
    rows = make_rows(1, 2, 2, 4, [5, 2])
    change(rows)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*rows.values(), 0.5)


def test_kernel_wrapper_rejects_selected_blocks_without_counts() -> None:
    rows = make_rows(1, 2, 2, 4, [5, 2])
    with pytest.raises(ValueError, match="go together"):
        paged_decode_attention(*rows.values(), 0.5, selected_blocks=torch.zeros(1, 2, 1, dtype=torch.int32))


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_sliding_window_starts_in_the_reference_and_the_torch_twin(softcap: float | None) -> None:
    """``starts`` (a sliding window's first visible token per row): the reference equals dense attention over
    tokens ``starts <= i < length``, and the engine's vectorised torch twin equals the reference."""
    from longctx.engine.fast_decode import paged_decode_torch  # noqa: PLC0415

    lengths = [17, 0, 1, 31, 9, 40]
    rows = make_rows(2, 3, 2, 8, lengths, seed=5)
    starts = torch.tensor([3, 0, 5, 30, -1, 12], dtype=torch.int32).view(2, 3)  # mid, empty, past, negative
    tokens = {(b, h): list(range(max(int(starts[b, h]), 0), int(rows["lengths"][b, h])))  # empty if past
              for b in range(2) for h in range(3)}
    scale = 0.7
    want = dense_attention(rows, scale, softcap, tokens)
    got = ref(rows, scale, softcap=softcap, starts=starts)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    twin = paged_decode_torch(rows["q"], rows["k_pool"], rows["v_pool"], rows["block_tables"], rows["lengths"],
                              scale, softcap, starts=starts)
    torch.testing.assert_close(twin.double(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="starts"):
        ref(rows, scale, starts=starts[:, :2])
