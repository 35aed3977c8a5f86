"""``adaptive``: a layer's budget split across kv-heads by score mass (AdaKV, Feng et al., arXiv:2407.11550)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longctx.kv.budget.base import BudgetAllocator
from longctx.kv.eviction import top_indices
from longctx.kv.registry import param, register


@register("budget", "adaptive")
@dataclass(frozen=True)
class Adaptive(BudgetAllocator):
    """Heads compete for the layer's budget by score (flattened top-k), each keeping a floor share.

    Scores must be comparable across heads: attention-based policies (snapkv, h2o, tova, corm).
    """

    alpha: float = param(0.2, "safeguard: every head keeps at least alpha * base tokens")

    uses_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def head_budgets(self, layer_budget: int, scores: Tensor, valid: Tensor) -> list[int]:
        num_heads = scores.shape[0]
        floor = int(self.alpha * layer_budget)
        total = layer_budget * num_heads
        shared = total - floor * num_heads
        s = scores.float().masked_fill(~valid, float("-inf"))
        counts = torch.zeros(num_heads, dtype=torch.int64)
        k = min(shared, int(valid.sum()))
        if k > 0:
            top = top_indices(s.reshape(-1), k)
            counts = torch.bincount(top // scores.shape[1], minlength=num_heads).cpu()
        # No clamp to the current row lengths: a head's budget is its share of the layer total, and rows
        # shorter than it (short prompt, early prefill chunk) keep growing into it during decode instead
        # of being cut back to their prefill length at every step.
        budgets = counts + floor
        return [int(b) for b in budgets]
