"""One decode token per sequence: rotate q and k (RoPE), write k, v and the position into the block pool.

The decode step's per-layer prologue (``engine.fast_decode``): q [B, Hq, D] and k/v [B, Hkv, D] un-rotated,
cos/sin [B, D] for the new tokens' positions, ``slots`` [B * Hkv] the flat pool slot each (sequence, kv-head)
row writes, ``positions`` [B]. Returns the rotated q; the pool gets rotated k, v and the original position.
The kernel does it in one launch (one program per query or kv head). It rotates in fp32 and rounds once,
where the twin (torch eager ``rotate``) rounds each product and the sum to the dtype: they agree within an
ulp or two of the terms' magnitude, and the kernel is the closer of the two to the exact rotation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.model.rope import rotate
from longctx.ops.dispatch import has_triton, use_triton


def rope_kv_write_ref(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor,
                      pos_pool: Tensor, slots: Tensor, positions: Tensor) -> Tensor:
    """Plain torch: returns rotated q [B, Hq, D]; writes the pools in place."""
    q_rot = rotate(q, cos[:, None], sin[:, None])
    k_rot = rotate(k, cos[:, None], sin[:, None])
    d = q.shape[-1]
    k_pool.view(-1, d)[slots] = k_rot.reshape(-1, d).to(k_pool.dtype)
    v_pool.view(-1, d)[slots] = v.reshape(-1, d).to(v_pool.dtype)
    pos_pool.view(-1)[slots] = positions.repeat_interleave(k.shape[1])
    return q_rot


if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kv_write_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kp_ptr, vp_ptr, pp_ptr, slot_ptr, posn_ptr, qo_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_sb, stride_ob, stride_oh,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Program (b, j): query head j < HQ, else kv head j - HQ (rotate k, copy v, write the position)."""
        b, j = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        c1 = tl.load(cos_ptr + b * stride_cb + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + b * stride_cb + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + b * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + b * stride_sb + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        is_q = j < HQ
        h = j - HQ
        if is_q:
            src = q_ptr + b * stride_qb + j * stride_qh
        else:
            src = k_ptr + b * stride_kb + h * stride_kh
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        if is_q:
            out = qo_ptr + b * stride_ob + j * stride_oh
            tl.store(out + offs, o1.to(qo_ptr.dtype.element_ty), mask=mask)
            tl.store(out + HALF + offs, o2.to(qo_ptr.dtype.element_ty), mask=mask)
        else:
            slot = tl.load(slot_ptr + b * HKV + h)
            kdst = kp_ptr + slot * (2 * HALF)
            tl.store(kdst + offs, o1.to(kp_ptr.dtype.element_ty), mask=mask)
            tl.store(kdst + HALF + offs, o2.to(kp_ptr.dtype.element_ty), mask=mask)
            vsrc = v_ptr + b * stride_vb + h * stride_vh
            vdst = vp_ptr + slot * (2 * HALF)
            tl.store(vdst + offs, tl.load(vsrc + offs, mask=mask).to(vp_ptr.dtype.element_ty), mask=mask)
            tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=mask).to(vp_ptr.dtype.element_ty),
                     mask=mask)
            tl.store(pp_ptr + slot, tl.load(posn_ptr + b))


def _kernel_ok(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor,
               pos_pool: Tensor, slots: Tensor) -> bool:
    d = q.shape[-1]
    return (use_triton(q, k, v) and d % 2 == 0 and q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype
            and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin))
            and k_pool.is_contiguous() and v_pool.is_contiguous() and pos_pool.is_contiguous()
            and k_pool.shape[-1] == d and slots.dtype == torch.int64 and slots.is_contiguous())


def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor,
                  pos_pool: Tensor, slots: Tensor, positions: Tensor) -> Tensor:
    """See the module docstring (Triton on CUDA, else :func:`rope_kv_write_ref`)."""
    if not _kernel_ok(q, k, v, cos, sin, k_pool, v_pool, pos_pool, slots):
        return rope_kv_write_ref(q, k, v, cos, sin, k_pool, v_pool, pos_pool, slots, positions)
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    q_rot = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        _rope_kv_write_kernel[(bsz, hq + hkv)](
            q, k, v, cos, sin, k_pool, v_pool, pos_pool, slots, positions.to(pos_pool.dtype), q_rot,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            sin.stride(0), q_rot.stride(0), q_rot.stride(1),
            HQ=hq, HKV=hkv, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), num_warps=1)
    return q_rot
