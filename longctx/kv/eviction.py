"""Choosing what a row keeps: forced sinks and recent tokens, then the highest scores.

Pure function over one layer's rows, shared by every retain policy, so a policy
never decides mechanics (STYLE.md: "the policy only scores").
"""

from __future__ import annotations

import torch
from torch import Tensor


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
        idx = torch.topk(s, b, sorted=False).indices if b else s.new_empty(0, dtype=torch.int64)
        keep.append(torch.sort(idx).values)
    return keep
