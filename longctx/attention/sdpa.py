"""Fast dense attention through ``torch.nn.functional.scaled_dot_product_attention``.

Used instead of the reference loop when nothing but the output is needed: the
positions policy forms plain ``q·k`` logits over stored (rotated) keys, no
soft-cap, and the retain policy needs no per-key attention mass. The
reference (``attention/reference.py``) stays the oracle; tests compare the two,
and ``LONGCTX_ATTENTION=reference`` forces the reference everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def reference_forced() -> bool:
    return os.environ.get("LONGCTX_ATTENTION", "").lower() == "reference"


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, mask: Callable[[], Tensor], scale: float,
                need_mask: bool = True) -> Tensor:
    """q [H, G, Tq, D] (rotated), k/v [H, L, D], mask() -> bool [H, Tq, L] (True = visible) -> out [H, G, Tq, D].

    Query rows that see no key give zeros, like the reference. When ``need_mask`` is False the
    caller guarantees the mask is plain causal over a row holding exactly these queries' tokens
    (Tq == L, a first prefill chunk) or all-visible (a decode step over full rows), and the
    cheaper unmasked kernel runs.
    """
    h, g, tq, d = q.shape
    length = k.shape[1]
    if not need_mask:
        return F.scaled_dot_product_attention(
            q.reshape(1, h * g, tq, d), k[None], v[None], is_causal=tq > 1, scale=scale, enable_gqa=True,
        ).view(h, g, tq, d)
    mask = mask()
    out = F.scaled_dot_product_attention(
        q, k[:, None].expand(h, g, length, d), v[:, None].expand(h, g, length, d),
        attn_mask=mask[:, None], scale=scale,
    )
    return out.masked_fill(~mask.any(dim=-1)[:, None, :, None], 0.0)
