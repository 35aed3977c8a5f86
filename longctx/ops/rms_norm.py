"""RMSNorm and residual-add + RMSNorm: torch twins (the definition) and one Triton kernel for both.

Semantics (the HF Llama/Gemma definition): the row is normalised in fp32, ``h = x * rsqrt(mean(x^2) + eps)``;
Llama-style norms then cast ``h`` to the input dtype and multiply by the weight (a product rounded to the
dtype); Gemma-style norms scale by ``1 + weight`` in fp32 and cast last. The fused variant first forms the
residual sum ``x + delta`` (rounded to the dtype, as the unfused add is), returns it, and normalises it.
The kernel rounds exactly where the twin does; only the order of the fp32 sum of squares differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.ops.dispatch import has_triton, use_triton


# ---- reference twins ----------------------------------------------------------------------------------------
def rms_norm_ref(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """RMSNorm of the last dimension of ``x`` (any leading shape)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(dtype)
    return weight * h.to(dtype)


def add_rms_norm_ref(x: Tensor, delta: Tensor, weight: Tensor, eps: float,
                     gemma: bool = False) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + delta), x + delta)."""
    residual = x + delta
    return rms_norm_ref(residual, weight, eps, gemma), residual


# ---- kernel -------------------------------------------------------------------------------------------------
if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, d_ptr, w_ptr, out_ptr, res_ptr, stride_x, stride_d, stride_o, stride_r, n_cols, eps,
        HAS_DELTA: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per row: optional residual sum (stored), fp32 normalisation, weight."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            y = h * (1.0 + w)
        else:
            y = w * h.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    """``x`` as [rows, D] with unit column stride (a copy only if it cannot be viewed so)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, gemma: bool) -> tuple[Tensor, Tensor | None]:
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    n, cols = x2.shape
    out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(n, cols, dtype=out_dtype, device=x.device)
    res = torch.empty_like(x2) if delta is not None else out
    block = triton.next_power_of_2(cols)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if n:
        with torch.cuda.device(x.device):
            _rms_norm_kernel[(n,)](x2, d2, weight, out, res, x2.stride(0), d2.stride(0), out.stride(0),
                                   res.stride(0), cols, float(eps), HAS_DELTA=delta is not None, GEMMA=gemma,
                                   BLOCK=block, num_warps=warps)
    return out.view(x.shape), (res.view(x.shape) if delta is not None else None)


def _kernel_ok(x: Tensor, weight: Tensor, delta: Tensor | None = None) -> bool:
    inputs = (weight,) if delta is None else (weight, delta)
    return use_triton(x, *inputs) and weight.is_contiguous() and weight.shape == x.shape[-1:]


# ---- dispatch -----------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """RMSNorm of the last dimension (Triton on CUDA, else :func:`rms_norm_ref`)."""
    if not _kernel_ok(x, weight):
        return rms_norm_ref(x, weight, eps, gemma)
    return _launch(x, None, weight, eps, gemma)[0]


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float,
                 gemma: bool = False) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + delta), x + delta) in one pass (Triton on CUDA, else :func:`add_rms_norm_ref`)."""
    if not _kernel_ok(x, weight, delta) or delta.shape != x.shape or delta.dtype != x.dtype:
        return add_rms_norm_ref(x, delta, weight, eps, gemma)
    out, res = _launch(x, delta, weight, eps, gemma)
    assert res is not None
    return out, res
