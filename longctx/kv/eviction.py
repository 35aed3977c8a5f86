"""Choosing what a row keeps: forced sinks and recent tokens, then the highest scores.

Pure function over one layer's rows, shared by every retain policy, so a policy
never decides mechanics (STYLE.md: "the policy only scores").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from longctx.device import to_device


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores along the last dimension; exact ties go to the earlier token, on
    every device (``topk`` breaks ties differently on CPU and CUDA, and max-pooled scores tie often)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def select_keep(scores: Tensor, lengths: list[int], budgets: list[int], sinks: int, recent: list[int]) -> list[Tensor]:
    """Sorted indices each row keeps.

    scores: [num_kv_heads, max_len]; lengths/budgets/recent: per head. A row no longer than
    its budget keeps everything. Otherwise it keeps its first ``sinks`` tokens and its last
    ``recent[h]`` tokens (sinks first if the budget is too small for both), then fills the rest
    of the budget with its highest-scoring tokens. Rows are stored in position order, so
    index order is position order.
    """
    keep = []
    for h, (n, b) in enumerate(zip(lengths, budgets, strict=True)):
        if n <= b:
            keep.append(torch.arange(n, device=scores.device))
            continue
        b = max(b, 0)
        num_sinks = min(sinks, b)
        num_recent = min(recent[h], b - num_sinks)
        forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
        forced[:num_sinks] = True
        if num_recent:
            forced[n - num_recent :] = True
        s = scores[h, :n].float().masked_fill(forced, float("inf"))
        s = torch.nan_to_num(s, nan=float("-inf"))
        idx = top_indices(s, b) if b else s.new_empty(0, dtype=torch.int64)
        keep.append(torch.sort(idx).values)
    return keep


def select_keep_padded(scores: Tensor, lengths: list[int], budgets: list[int], sinks: int,
                       recent: list[int]) -> tuple[Tensor, list[int]]:
    """:func:`select_keep` for all rows at once, without host synchronisation: (indices [R, k], counts).

    Row r keeps ``indices[r, :counts[r]]`` (sorted); entries past its count are padding. Counts are known on
    the host (``min(length, budget)``), so callers can rewrite rows and free blocks without reading the
    device. Rows may have different budgets (one stable sort orders every row; each takes its own prefix),
    and may come from several layers. Same choice as :func:`select_keep`, ties included.
    """
    n = np.asarray(lengths, dtype=np.int64)
    b_raw = np.asarray(budgets, dtype=np.int64)
    if n.shape != b_raw.shape or n.shape != (len(recent),):
        raise ValueError(f"lengths, budgets and recent must have one entry per row: {len(lengths)}, {len(budgets)}, "
                         f"{len(recent)}")
    b = np.maximum(b_raw, 0)
    counts_np = np.minimum(n, b)
    counts = counts_np.tolist()
    k = max(int(counts_np.max(initial=0)), 1)
    num_rows, max_len = scores.shape
    dev = scores.device
    # forced: index < lo[r] or index >= hi[r] (everything, for a row within its budget)
    over = n > b_raw
    num_sinks = np.minimum(sinks, b)
    lo = np.where(over, num_sinks, n)
    hi = np.where(over, n - np.minimum(np.asarray(recent, dtype=np.int64), b - num_sinks), 0)
    both = to_device(torch.from_numpy(np.stack([n, lo, hi, counts_np])), dev)
    n_t, lo_t, hi_t, c_t = (x[:, None] for x in both)
    idx = torch.arange(max_len, device=dev)[None, :]
    valid = idx < n_t
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).clamp_min(torch.finfo(torch.float32).min)
    s = s.masked_fill((idx < lo_t) | (idx >= hi_t), float("inf")).masked_fill(~valid, float("-inf"))
    if k > max_len:
        s = torch.nn.functional.pad(s, (0, k - max_len), value=float("-inf"))
    top = top_indices(s, k)  # [R, k]: each row's best first
    top = top.masked_fill(torch.arange(k, device=dev)[None, :] >= c_t, max_len)  # past the count: padding
    return torch.sort(top, dim=1).values, counts
