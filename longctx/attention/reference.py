"""Reference attention over gathered rows: plain, obviously-correct torch (the oracle).

Queries of one sequence attend to one layer's rows (one row per kv-head, GQA:
``group`` query heads share a row). Queries are processed in chunks so that a
long prompt never materialises its full attention matrix; the same pass can
return, per key, the attention mass it received (summed over the query heads
of its group and over the queries), which accumulation policies (H2O, A2SF)
need.

Logits and masks come from callables so that positions policies (native RoPE,
re-rotation, Self-Extend, LM-Infinite) can define them without this module
knowing about positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# logits_fn(q_start, q_end) -> logits [num_kv_heads, group, q_end - q_start, max_len] (unscaled)
LogitsFn = Callable[[int, int], Tensor]
# mask_fn(q_start, q_end) -> bool [num_kv_heads, q_end - q_start, max_len], True = may attend
MaskFn = Callable[[int, int], Tensor]

QUERY_CHUNK = 512


def attention_probs(logits: Tensor, mask: Tensor, scale: float, softcap: float | None) -> Tensor:
    """Softmax of scaled (optionally soft-capped) logits under ``mask``, in fp32.

    logits [H, G, Tq, L]; mask [H, Tq, L]. Rows with no visible key give zeros.
    """
    s = logits.float() * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def attend(
    num_queries: int,
    logits_fn: LogitsFn,
    mask_fn: MaskFn,
    v: Tensor,
    scale: float,
    softcap: float | None = None,
    want_key_mass: bool = False,
    query_weights: Tensor | None = None,
    chunk: int = QUERY_CHUNK,
) -> tuple[Tensor, Tensor | None]:
    """Attention of ``num_queries`` queries over rows with values ``v`` [H, L, D].

    Returns (out [H, G, Tq, D] in v's dtype, key_mass [H, L] fp32 or None), where
    key_mass[h, j] is the attention probability key j received, summed over the
    queries and the G query heads of row h; ``query_weights`` [Tq] weighs each query's
    contribution (A2SF's forgetting factor).
    """
    outs = []
    key_mass = torch.zeros(v.shape[0], v.shape[1], dtype=torch.float32, device=v.device) if want_key_mass else None
    for start in range(0, num_queries, chunk):
        end = min(start + chunk, num_queries)
        p = attention_probs(logits_fn(start, end), mask_fn(start, end), scale, softcap)  # [H, G, tq, L]
        outs.append(torch.matmul(p.to(v.dtype), v[:, None]))  # [H, G, tq, D]
        if key_mass is not None:
            if query_weights is not None:
                p = p * query_weights[start:end, None].to(p.device)
            key_mass += p.sum(dim=(1, 2))
    return torch.cat(outs, dim=2), key_mass


def causal_mask(q_pos: Tensor, k_pos: Tensor, valid: Tensor, window: int | None) -> Tensor:
    """bool [H, Tq, L]: key j visible to query i iff valid, k_pos <= q_pos and within the sliding window.

    q_pos [Tq]; k_pos, valid [H, L]. Window semantics follow HF: visible iff q_pos - k_pos < window.
    """
    diff = q_pos[None, :, None] - k_pos[:, None, :]  # [H, Tq, L]
    m = valid[:, None, :] & (diff >= 0)
    if window is not None:
        m &= diff < window
    return m
