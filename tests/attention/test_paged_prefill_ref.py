"""The varlen paged prefill reference equals a naive per-query attention over each row's tokens (fp64), and SDPA
with a causal prefix mask when rows are not compressed; bad arguments are refused with one clear line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.attention.triton.check_prefill import PrefillCase, make_inputs
from longctx.attention.triton.paged_prefill import paged_prefill_attention_ref, prefill_tiles


def make_chunks(chunks: list[int], lengths: list[list[int]], group: int, block_size: int, seed: int = 0,
                head_dim: int = 16) -> dict:
    """The GPU check's random inputs (shuffled pool blocks, garbage table tails, increasing positions with gaps
    per row, each chunk at its sequence's newest positions) for rows (s, h) of ``lengths[s][h]`` tokens."""
    hkv = len(lengths[0])
    prefixes = tuple(n - chunks[r // hkv] for r, n in enumerate(x for row in lengths for x in row))
    case = PrefillCase(tuple(chunks), prefixes, hkv, group, head_dim, block_size, torch.float32)
    rows = make_inputs(case, torch.Generator().manual_seed(seed), "cpu")
    rows["cu_seqlens"] = torch.tensor(rows.pop("cu"), dtype=torch.int32)
    return rows


def naive(rows: dict, scale: float, softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """One query at a time, fp64: softmax over the row's tokens up to the query's own index (and in the window)."""
    q, kp, vp, tables, lens, cu = (rows[n] for n in ("q", "k_pool", "v_pool", "block_tables", "lengths",
                                                     "cu_seqlens"))
    hq, hkv, bs = q.shape[1], lens.shape[1], kp.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(lens.shape[0]):
        n = int(cu[s + 1] - cu[s])
        for i in range(n):
            t = int(cu[s]) + i
            for j in range(hq):
                h = j // (hq // hkv)
                row = int(lens[s, h]) - n + i
                idx = [x for x in range(row + 1) if window is None or int(rows["q_pos"][t]) - int(
                    rows["pos_pool"][tables[s, h, x // bs], x % bs]) < window]
                k = torch.stack([kp[tables[s, h, x // bs], x % bs] for x in idx]).double()
                v = torch.stack([vp[tables[s, h, x // bs], x % bs] for x in idx]).double()
                sc = k @ q[t, j].double() * scale
                if softcap:
                    sc = softcap * torch.tanh(sc / softcap)
                out[t, j] = torch.softmax(sc, 0) @ v
    return out


def ref(rows: dict, scale: float, **kw) -> torch.Tensor:
    return paged_prefill_attention_ref(rows["q"], rows["k_pool"], rows["v_pool"], rows["block_tables"],
                                       rows["lengths"], rows["cu_seqlens"], scale, **kw)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [None, 7])
def test_ragged_compressed_rows_equal_naive_attention(softcap: float | None, window: int | None) -> None:
    # three sequences: chunks of 5, 1 and 9 tokens; rows of different lengths per kv head (compressed prefixes)
    rows = make_chunks([5, 1, 9], [[5, 13], [8, 3], [30, 9]], group=2, block_size=4, seed=1)
    kw = {"softcap": softcap}
    if window is not None:
        kw.update(window=window, pos_pool=rows["pos_pool"], q_pos=rows["q_pos"])
    got = ref(rows, 0.3, **kw)
    torch.testing.assert_close(got.double(), naive(rows, 0.3, softcap, window), rtol=1e-5, atol=1e-5)


def test_uncompressed_rows_equal_sdpa_with_a_cached_prefix() -> None:
    """Rows = 11 cached tokens + a 6-token chunk, every head alike: SDPA of the chunk's queries over the dense
    row, each query seeing the prefix and the chunk up to itself."""
    prefix, n, hkv, group, d = 11, 6, 2, 3, 16
    rows = make_chunks([n], [[prefix + n] * hkv], group=group, block_size=4, seed=2, head_dim=d)
    bs, tables = 4, rows["block_tables"]
    idx = torch.arange(prefix + n)
    k = torch.stack([rows["k_pool"][tables[0, h, idx // bs].long(), idx % bs] for h in range(hkv)])  # [Hkv, L, D]
    v = torch.stack([rows["v_pool"][tables[0, h, idx // bs].long(), idx % bs] for h in range(hkv)])
    q = rows["q"].transpose(0, 1)  # [Hq, n, D]
    mask = idx[None, :] <= (prefix + torch.arange(n))[:, None]  # [n, L]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                                          attn_mask=mask, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(ref(rows, 0.25), want, rtol=1e-5, atol=1e-5)


def test_empty_chunks_and_tiles() -> None:
    rows = make_chunks([0, 4, 0], [[2, 2], [4, 6], [1, 1]], group=1, block_size=4, seed=3)
    out = ref(rows, 0.5)
    assert out.shape == (4, 2, 16)
    torch.testing.assert_close(out.double(), naive(rows, 0.5), rtol=1e-5, atol=1e-5)
    seq, start = prefill_tiles([0, 0, 5, 5, 70], 32)
    assert seq == [1, 3, 3, 3] and start == [0, 5, 37, 69]


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(lengths=r["lengths"][:, :1]), "block_tables must be"),
    (lambda r: r.update(cu_seqlens=r["cu_seqlens"][:-1]), "cu_seqlens must be"),
    (lambda r: r.update(lengths=r["lengths"].float()), "lengths must be an integer"),
    (lambda r: r.update(q=r["q"][:, :3]), "not a multiple of num_kv_heads"),
])
def test_bad_arguments_are_named(change, message: str) -> None:  # noqa: ANN001
    rows = make_chunks([3], [[3, 5]], group=2, block_size=4)
    change(rows)
    with pytest.raises(ValueError, match=message):
        ref(rows, 0.5)
    rows = make_chunks([3], [[3, 5]], group=2, block_size=4)
    with pytest.raises(ValueError, match="a window needs pos_pool"):
        ref(rows, 0.5, window=4)
    short = make_chunks([3], [[3, 5]], group=2, block_size=4)
    short["lengths"][0, 0] = 2
    with pytest.raises(ValueError, match="fewer than its chunk"):
        ref(short, 0.5)
