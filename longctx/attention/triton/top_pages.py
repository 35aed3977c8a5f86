"""Quest's page choice in one kernel: each row's top ``k`` pages by bound, their count, and the bytes they read.

For a row (b, h) with bound [cap] fp32 (from :mod:`~longctx.attention.triton.quest_bound`: -inf past the row,
+inf for the forced first / newest block) the kernel finds the k-th largest value by a 32-step bitwise search
over the scores' order-preserving int32 bit patterns, takes every block above it and, of the blocks equal to it,
the lowest indices (ties go to the earlier block, as :func:`top_indices`), and writes
their indices in ascending order: ``blocks[b, h, :k]`` (int32), ``num[b, h] = min(k, ceil(length / BS))``
(the row's real pages come first in index order, so the first ``num`` entries are the row's choice). With an
accumulator it also adds the bytes the row reads in this layer to ``acc[b, h]`` (int64): selected tokens ×
``token_bytes`` plus the row's blocks × ``block_bytes`` (the summaries ranked), so a decode step counts bytes
without any extra kernel per layer (each (b, h) cell has one writer per layer, layers run in order).

One program per row keeps the whole row in registers: rows up to :data:`MAX_BLOCKS` blocks (256K tokens at
block size 16). When a batch has few rows (batch 1: one program per kv-head, a few of the GPU's SMs busy) and
the rows are long, each row is first split into chunks whose k best become candidates (many programs), then
one program per row chooses among the candidates: the same choice, since a row's k best are among its chunks'
k best. Tables too long for that use the twin. (On the H200 at 128K, batch 1: 35.7 us per layer in one pass,
18.5 us split in 8 chunks; CUDA-graph timings of ``scripts/gpu_select_kernels.py --sweep``.)
:func:`top_pages_ref` is the plain-torch twin (``torch.topk`` over unique int64 keys, then sorted), the same
choice on every device; ``longctx.kv.select.check`` compares the two on the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

HAS_TRITON = triton is not None
MAX_BLOCKS = 16384


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest of scores [..., n] (fp32, no NaN), largest first, ties to the lower index: the
    same choice on every device. Each score becomes a unique int64 key (its order-preserving bit pattern, then
    the reversed index), so ``torch.topk`` (a radix select: cheaper than sorting the row) has no ties."""
    n = scores.shape[-1]
    bits = (scores + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    keys = (ordered << 32) | (n - 1 - torch.arange(n, device=scores.device))
    return torch.topk(keys, min(k, n), dim=-1).indices


def top_pages_ref(bound: Tensor, lengths: Tensor, k: int, block_size: int, acc: Tensor | None = None,
                  token_bytes: int = 0, block_bytes: int = 0) -> tuple[Tensor, Tensor]:
    """bound [B, H, n] fp32, lengths [B, H] tokens, 1 <= k <= n -> (blocks [B, H, k] int32 ascending,
    num [B, H] int32); adds each row's bytes read to ``acc`` [B, H] int64 when given."""
    blocks = top_indices(bound, k).sort(-1).values.to(torch.int32)
    nblk = (lengths.long() + block_size - 1) // block_size
    num = nblk.clamp(max=k)
    if acc is not None:
        tokens = num * block_size - (nblk * block_size - lengths.long())
        acc += tokens * token_bytes + nblk * block_bytes
    return blocks, num.to(torch.int32)


if HAS_TRITON:

    @triton.jit
    def _order_keys(s):
        """Signed int32 keys in the order of the fp32 scores s (-0.0 as 0.0; NaN never occurs)."""
        bits = (s + 0.0).to(tl.int32, bitcast=True)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @triton.jit
    def _kth_largest(key, k):
        """The k-th largest of the int32 keys (padding: INT32_MIN), bit by bit from the top: the largest t with
        count(key >= t) >= k."""
        t = tl.where(tl.sum((key >= 0).to(tl.int32), axis=0) >= k, 0, -2147483647 - 1)
        for i in tl.static_range(31):
            cand = t | (1 << (30 - i))
            t = tl.where(tl.sum((key >= cand).to(tl.int32), axis=0) >= k, cand, t)
        return t

    @triton.jit
    def _take(key, k):
        """Which keys are among the k largest (ties to the earlier position) and their rank in position order."""
        t = _kth_largest(key, k)
        above = key > t
        tie = key == t
        take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= k - tl.sum(above.to(tl.int32), axis=0)))
        return take, tl.cumsum(take.to(tl.int32), axis=0) - 1

    @triton.jit
    def _top_pages_kernel(bound_ptr, cand_ptr, len_ptr, blocks_ptr, num_ptr, acc_ptr, n, k,
                          stride_bb, stride_bh, stride_lb, stride_lh, stride_ob, stride_oh, stride_nb, stride_nh,
                          stride_ab, stride_ah, token_bytes, block_bytes,
                          BS: tl.constexpr, BLOCK_N: tl.constexpr, COUNT: tl.constexpr, MERGE: tl.constexpr):
        """One row's choice over n scores (MERGE=False) or over n candidates from :func:`_top_chunk_kernel`
        (MERGE=True: keys, then their block indices, per row in ``cand_ptr`` [B, H, 2, n] int32)."""
        b, h = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, BLOCK_N)
        inside = offs < n
        if MERGE:
            row = cand_ptr + (b * tl.num_programs(1) + h) * 2 * n
            key = tl.load(row + offs, mask=inside, other=-2147483647 - 1)
            idx = tl.load(row + n + offs, mask=inside, other=0)
        else:
            s = tl.load(bound_ptr + b * stride_bb + h * stride_bh + offs, mask=inside, other=float("-inf"))
            key = tl.where(inside, _order_keys(s), -2147483647 - 1)  # padding below every real key
            idx = offs
        take, pos = _take(key, k)
        tl.store(blocks_ptr + b * stride_ob + h * stride_oh + pos, idx.to(tl.int32), mask=take)
        length = tl.load(len_ptr + b * stride_lb + h * stride_lh).to(tl.int64)
        nblk = (length + BS - 1) // BS
        num = tl.minimum(nblk, k)
        tl.store(num_ptr + b * stride_nb + h * stride_nh, num.to(tl.int32))
        if COUNT:
            tokens = num * BS - (nblk * BS - length)
            cell = acc_ptr + b * stride_ab + h * stride_ah
            tl.store(cell, tl.load(cell) + tokens * token_bytes + nblk * block_bytes)

    @triton.jit
    def _top_chunk_kernel(bound_ptr, cand_ptr, n, k, chunk, stride_bb, stride_bh,
                          BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """Chunk p of row (b, h): its k largest keys (ties to the earlier block) and their block indices, in
        index order, at candidates [p * k, (p + 1) * k) of the row; unfilled places get padding keys."""
        b, h, p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs = p * chunk + tl.arange(0, BLOCK_C)
        inside = (offs < n) & (offs < (p + 1) * chunk)
        s = tl.load(bound_ptr + b * stride_bb + h * stride_bh + offs, mask=inside, other=float("-inf"))
        key = tl.where(inside, _order_keys(s), -2147483647 - 1)
        take, pos = _take(key, k)
        total = tl.num_programs(2) * k
        row = cand_ptr + (b * tl.num_programs(1) + h) * 2 * total + p * k
        tl.store(row + pos, key, mask=take)
        tl.store(row + total + pos, offs.to(tl.int32), mask=take)
        got = tl.sum(take.to(tl.int32), axis=0)
        rest = tl.arange(0, BLOCK_K)
        tl.store(row + rest, tl.full([BLOCK_K], -2147483647 - 1, tl.int32), mask=(rest >= got) & (rest < k))


def split_count(rows: int, n: int, k: int) -> int:
    """Chunks per row for the two-pass choice: a power of two with at least 4k blocks per chunk and at most
    512 programs in all (1: one program per row is parallel enough, or the row is too short to split)."""
    p = 1
    while n >= 1024 and 2 * p * 4 * k <= n and rows * 2 * p <= 512:
        p *= 2
    while -(-n // p) > MAX_BLOCKS:  # every chunk must fit one program
        p *= 2
    return p


def _warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def top_pages(bound: Tensor, lengths: Tensor, k: int, block_size: int, acc: Tensor | None = None,
              token_bytes: int = 0, block_bytes: int = 0, interpret: bool = False,
              chunks: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`top_pages_ref`'s result: the Triton kernels on CUDA, the twin elsewhere (``interpret``: run the
    kernels anyway, for Triton's CPU interpreter in tests). Rows of many blocks with few rows in the batch are
    split in chunks (:func:`split_count`), each chunk keeping its k best as candidates, then merged: the k best
    of a row are among the k best of its chunks, so the choice is the same. ``chunks`` overrides the split
    (benchmarks)."""
    bsz, h, n = bound.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the table's blocks), got {k}")
    chunks = chunks or split_count(bsz * h, n, k)
    if not (HAS_TRITON and (bound.is_cuda or interpret)) or max(chunks * k, -(-n // chunks)) > MAX_BLOCKS:
        return top_pages_ref(bound, lengths, k, block_size, acc, token_bytes, block_bytes)
    if bound.stride(-1) != 1:
        bound = bound.contiguous()
    blocks = torch.empty(bsz, h, k, dtype=torch.int32, device=bound.device)
    num = torch.empty(bsz, h, dtype=torch.int32, device=bound.device)
    cell = acc if acc is not None else num  # never written without COUNT
    cand, width = num, n  # cand is unused without a split
    if chunks > 1:
        width = chunks * k
        cand = torch.empty(bsz, h, 2, width, dtype=torch.int32, device=bound.device)
        chunk = -(-n // chunks)
        block_c = max(triton.next_power_of_2(chunk), 16)
        _top_chunk_kernel[(bsz, h, chunks)](bound, cand, n, k, chunk, bound.stride(0), bound.stride(1),
                                            BLOCK_C=block_c, BLOCK_K=max(triton.next_power_of_2(k), 16),
                                            num_warps=_warps(block_c))
    block_n = max(triton.next_power_of_2(width), 16)
    _top_pages_kernel[(bsz, h)](bound, cand, lengths, blocks, num, cell, width, k,
                                bound.stride(0), bound.stride(1), lengths.stride(0), lengths.stride(1),
                                blocks.stride(0), blocks.stride(1), num.stride(0), num.stride(1),
                                cell.stride(0), cell.stride(1), token_bytes, block_bytes,
                                BS=block_size, BLOCK_N=block_n, COUNT=acc is not None, MERGE=chunks > 1,
                                num_warps=_warps(block_n))
    return blocks, num
