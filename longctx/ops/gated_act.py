"""Gated MLP activation ``act(gate) * up`` (SiLU for Llama/Mistral/Qwen, GELU for Gemma): twin + Triton kernel.

``gate`` and ``up`` are usually the two halves of one fused gate/up projection output (views with a row
stride of 2 * intermediate). Semantics are torch's for the unfused ops: the activation is computed in fp32
and rounded to the dtype, then the product is rounded again; the kernel rounds at the same two places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longctx.ops.dispatch import has_triton, use_triton

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")


def _check(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")


def activation_ref(x: Tensor, act: str) -> Tensor:
    _check(act)
    if act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_pytorch_tanh" else "none")


def gated_act_ref(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """``act(gate) * up`` in plain torch."""
    return activation_ref(gate, act) * up


if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_act_kernel(g_ptr, u_ptr, o_ptr, stride_g, stride_u, stride_o, n_cols,
                          ACT: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row, column block): o = round(act(g)) * u, rounded."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0)
        if ACT == 0:  # silu
            a = g / (1.0 + tl.exp(-g))
        elif ACT == 1:  # exact gelu
            a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        else:  # tanh-approximate gelu; tanh(z) = 2 sigmoid(2z) - 1
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
        a = a.to(o_ptr.dtype.element_ty).to(tl.float32)
        tl.store(o_ptr + row * stride_o + offs, (a * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


def gated_act(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """``act(gate) * up`` for [rows, cols] tensors with unit column stride (Triton on CUDA, else the twin)."""
    _check(act)
    if (not use_triton(gate, up) or gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype
            or gate.stride(-1) != 1 or up.stride(-1) != 1):
        return gated_act_ref(gate, up, act)
    n, cols = gate.shape
    out = torch.empty(n, cols, dtype=gate.dtype, device=gate.device)
    block = 1024
    if n:
        with torch.cuda.device(gate.device):
            _gated_act_kernel[(n, triton.cdiv(cols, block))](
                gate, up, out, gate.stride(0), up.stride(0), out.stride(0), cols,
                ACT=ACTIVATIONS.index(act), BLOCK=block, num_warps=4)
    return out
