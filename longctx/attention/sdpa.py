"""Fast dense attention through ``torch.nn.functional.scaled_dot_product_attention``.

Used instead of the reference loop when nothing but the output is needed: the
positions policy forms plain ``q·k`` logits over stored (rotated) keys, no
soft-cap, and the retain policy needs no per-key attention mass. The
reference (``attention/reference.py``) stays the oracle; tests compare the two,
and ``LONGCTX_ATTENTION=reference`` forces the reference everywhere.

On CUDA the cuDNN backend is left out (:data:`BACKENDS`): PyTorch prefers it on Hopper, but it builds a plan
for every new (query, key) length pair, which prompt chunks of ever-changing lengths keep doing (~0.9 ms of
host time per call). Measured on the H200 (``scripts/gpu_profile_serve.py``, 32 x 4K prompts, 8B shape):
mixed steps 324 -> 255 ms, the whole run 9.0 -> 6.3 s with the flash backend instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def reference_forced() -> bool:
    return os.environ.get("LONGCTX_ATTENTION", "").lower() == "reference"


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, mask: Callable[[], Tensor], scale: float,
                need_mask: bool = True) -> Tensor:
    """q [H, G, Tq, D] (rotated), k/v [H, L, D], mask() -> bool [H, Tq, L] (True = visible) -> out [H, G, Tq, D].

    Query rows that see no key give zeros, like the reference. When ``need_mask`` is False the
    caller guarantees every row holds the same number of tokens, ending with these Tq queries' own
    tokens, and that each query sees exactly the entries up to its own (no window): the mask is
    then bottom-right causal and a fused kernel runs without materialising it (a decode step,
    a first prefill chunk, or a later chunk over a compressed cache).
    """
    if q.is_cuda:
        with sdpa_kernel(BACKENDS):
            return _sdpa_attend(q, k, v, mask, scale, need_mask)
    return _sdpa_attend(q, k, v, mask, scale, need_mask)


def sdpa_whole(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """q [H, G, T, D] (rotated), k/v [H, T, D] of one whole sequence -> out [H, G, T, D]; ``bias`` None: causal,
    else an additive [T, T] mask (0 visible, -inf hidden) shared by every head, in which every query sees at
    least itself (no empty rows to zero). Differentiable; the training-time contexts of ``heads`` use it."""
    h, g, t, d = q.shape
    args = dict(attn_mask=bias, is_causal=bias is None, scale=scale, enable_gqa=True)
    if q.is_cuda:
        with sdpa_kernel(BACKENDS):
            out = F.scaled_dot_product_attention(q.reshape(1, h * g, t, d), k[None], v[None], **args)
    else:
        out = F.scaled_dot_product_attention(q.reshape(1, h * g, t, d), k[None], v[None], **args)
    return out.view(h, g, t, d)


def _sdpa_attend(q: Tensor, k: Tensor, v: Tensor, mask: Callable[[], Tensor], scale: float,
                 need_mask: bool) -> Tensor:
    h, g, tq, d = q.shape
    length = k.shape[1]
    if not need_mask:
        if tq == 1:
            bias = None
        elif tq == length:
            bias = "causal"
        else:
            bias = causal_lower_right(tq, length)
        return F.scaled_dot_product_attention(
            q.reshape(1, h * g, tq, d), k[None], v[None], attn_mask=None if bias == "causal" else bias,
            is_causal=bias == "causal", scale=scale, enable_gqa=True,
        ).view(h, g, tq, d)
    mask = mask()
    out = F.scaled_dot_product_attention(
        q, k[:, None].expand(h, g, length, d), v[:, None].expand(h, g, length, d),
        attn_mask=mask[:, None], scale=scale,
    )
    return out.masked_fill(~mask.any(dim=-1)[:, None, :, None], 0.0)
