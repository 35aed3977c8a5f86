"""``pyramid``: budgets shrink linearly with depth (PyramidKV, Cai et al., arXiv:2406.02069)."""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.budget.base import BudgetAllocator
from longctx.kv.registry import param, register


@register("budget", "pyramid")
@dataclass(frozen=True)
class Pyramid(BudgetAllocator):
    """Layer budgets form an arithmetic sequence, largest at the bottom; the mean equals the base."""

    beta: float = param(20.0, "top layer keeps base/beta tokens; the bottom layer keeps 2*base - base/beta")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_budgets(self, base: int, num_layers: int) -> list[int]:
        if num_layers == 1:
            return [base]
        low = base / self.beta
        high = 2 * base - low
        step = (high - low) / (num_layers - 1)
        return [max(1, round(high - i * step)) for i in range(num_layers)]
