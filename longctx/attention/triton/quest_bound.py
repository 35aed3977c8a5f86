"""Quest's page bound in one kernel: for each row's blocks, the upper bound on q·k from the block summaries.

``bound[b, h, j] = max over the G query heads g of the group of sum_d max(q[b, h*G+g, d] * kmin_d,
q[b, h*G+g, d] * kmax_d)`` where (kmin, kmax) = ``summaries[block_tables[b, h, j]]``; -inf for j past the
row's ``ceil(lengths[b, h] / block_size)`` blocks; +inf for the first and the newest block when ``force_ends``
(Quest always reads them). The kernel reads each summary once from the pool through the
block table (no gathered copy, no matmul over a strided view), fp32 math.

:func:`quest_bound_ref` is the plain-torch twin (two matmuls: ``q⁺ · kmax + q⁻ · kmin``, the same value up to
rounding) that runs everywhere else; ``longctx.kv.select.check`` compares the two on the GPU.

:func:`update_block_summaries` is the decode step's summary write: for each just-written flat slot, the min / max
over the valid tokens of its block (``slot % block_size + 1`` of them), one program per slot; its twin is
:func:`longctx.kv.select.summaries.block_summaries_dense`.
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
BLOCK_J = 64


def quest_bound_ref(q: Tensor, summaries: Tensor, block_tables: Tensor, lengths: Tensor, block_size: int,
                    force_ends: bool = False) -> Tensor:
    """q [B, Hq, D]; summaries [N, 2, D]; block_tables [B, H, cap]; lengths [B, H] -> bound [B, H, cap] fp32
    (computed in fp32, like the kernel)."""
    bsz, h, cap = block_tables.shape
    nblk = (lengths.long() + block_size - 1) // block_size
    inside = torch.arange(cap, device=q.device)[None, None, :] < nblk[:, :, None]
    idx = torch.where(inside, block_tables.long(), 0)
    kmin, kmax = summaries[:, 0][idx].float(), summaries[:, 1][idx].float()  # [B, H, cap, D]
    qg = q.view(bsz, h, -1, q.shape[-1]).float()
    bound = torch.matmul(qg.clamp(min=0), kmax.transpose(-1, -2))
    bound = bound.add_(torch.matmul(qg.clamp(max=0), kmin.transpose(-1, -2))).amax(2)
    bound = bound.masked_fill(~inside, float("-inf"))
    if force_ends:
        j = torch.arange(cap, device=q.device)[None, None, :]
        bound = bound.masked_fill((j == 0) | (j == nblk[:, :, None] - 1), float("inf"))
    return bound


if HAS_TRITON:

    @triton.jit
    def _quest_bound_kernel(q_ptr, s_ptr, table_ptr, len_ptr, out_ptr, cap,
                            stride_qb, stride_qh, stride_sn, stride_s2, stride_tb, stride_th, stride_lb, stride_lh,
                            stride_ob, stride_oh,
                            G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                            BS: tl.constexpr, FORCE_ENDS: tl.constexpr):
        b, h, jb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        length = tl.load(len_ptr + b * stride_lb + h * stride_lh)
        nblk = (length + BS - 1) // BS
        valid = offs_j < nblk
        blk = tl.load(table_ptr + b * stride_tb + h * stride_th + offs_j, mask=valid, other=0).to(tl.int64)
        base = s_ptr + blk[:, None] * stride_sn + offs_d[None, :]
        m2 = valid[:, None] & d_mask[None, :]
        kmin = tl.load(base, mask=m2, other=0.0).to(tl.float32)
        kmax = tl.load(base + stride_s2, mask=m2, other=0.0).to(tl.float32)
        best = tl.full([BLOCK_J], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            qg = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + offs_d, mask=d_mask, other=0.0)
            qg = qg.to(tl.float32)[None, :]
            bound = tl.sum(tl.maximum(qg * kmin, qg * kmax), axis=1)
            best = tl.maximum(best, bound)
        best = tl.where(valid, best, float("-inf"))
        if FORCE_ENDS:
            best = tl.where(valid & ((offs_j == 0) | (offs_j == nblk - 1)), float("inf"), best)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_j, best, mask=offs_j < cap)


if HAS_TRITON:

    @triton.jit
    def _summary_update_kernel(k_ptr, s_ptr, slot_ptr, stride_kn, stride_kt, stride_sn, stride_s2,
                               D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr):
        slot = tl.load(slot_ptr + tl.program_id(0))
        blk = slot // BS
        n = slot % BS + 1
        offs_t = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t[:, None] < n) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + blk * stride_kn + offs_t[:, None] * stride_kt + offs_d[None, :], mask=mask, other=0.0)
        k = k.to(tl.float32)
        kmin = tl.min(tl.where(mask, k, float("inf")), axis=0)
        kmax = tl.max(tl.where(mask, k, float("-inf")), axis=0)
        d_mask = offs_d < D
        tl.store(s_ptr + blk * stride_sn + offs_d, kmin.to(s_ptr.dtype.element_ty), mask=d_mask)
        tl.store(s_ptr + blk * stride_sn + stride_s2 + offs_d, kmax.to(s_ptr.dtype.element_ty), mask=d_mask)


def update_block_summaries(k_pool: Tensor, summary: Tensor, slots: Tensor) -> bool:
    """Recompute ``summary`` [N, 2, D] of the blocks holding ``slots`` [n] in one kernel; False (nothing done)
    where the kernel cannot run (no Triton, not CUDA, a block size that is not a power of two)."""
    bs, d = k_pool.shape[1], k_pool.shape[2]
    if not (HAS_TRITON and k_pool.is_cuda) or bs & (bs - 1):
        return False
    _summary_update_kernel[(slots.numel(),)](k_pool, summary, slots, k_pool.stride(0), k_pool.stride(1),
                                             summary.stride(0), summary.stride(1),
                                             D=d, BLOCK_D=triton.next_power_of_2(d), BS=bs)
    return True


def quest_bound(q: Tensor, summaries: Tensor, block_tables: Tensor, lengths: Tensor, block_size: int,
                force_ends: bool = False, block_j: int = BLOCK_J, num_warps: int = 8) -> Tensor:
    """The page bound [B, H, cap] fp32: the Triton kernel on CUDA (``block_j`` blocks per program, a power of
    two), the torch twin elsewhere."""
    if not (HAS_TRITON and q.is_cuda):
        return quest_bound_ref(q, summaries, block_tables, lengths, block_size, force_ends)
    bsz, h, cap = block_tables.shape
    d = q.shape[-1]
    g = q.shape[1] // h
    out = torch.empty(bsz, h, cap, dtype=torch.float32, device=q.device)
    tables = block_tables if block_tables.dtype in (torch.int32, torch.int64) else block_tables.long()
    grid = (bsz, h, triton.cdiv(cap, block_j))
    _quest_bound_kernel[grid](q, summaries, tables, lengths, out, cap,
                              q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1),
                              tables.stride(0), tables.stride(1), lengths.stride(0), lengths.stride(1),
                              out.stride(0), out.stride(1),
                              G=g, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_J=block_j, BS=block_size,
                              FORCE_ENDS=force_ends, num_warps=num_warps)
    return out
