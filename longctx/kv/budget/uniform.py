"""``none`` (no limit) and ``uniform`` (the same budget for every row) allocators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longctx.kv.budget.base import BudgetAllocator
from longctx.kv.registry import register


@register("budget", "none")
@dataclass(frozen=True)
class NoBudget:
    """No limit: rows keep everything (only valid with retain=full)."""

    unlimited: ClassVar[bool] = True


@register("budget", "uniform")
@dataclass(frozen=True)
class Uniform(BudgetAllocator):
    """Every layer and kv-head keeps the same number of tokens."""
