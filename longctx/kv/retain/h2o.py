"""``h2o``: heavy hitters by accumulated attention plus recent tokens (Zhang et al., arXiv:2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "h2o")
@dataclass(frozen=True)
class H2O(RetainPolicy):
    """Keep recent tokens plus the tokens with the largest attention accumulated over all queries."""

    needs_key_mass: ClassVar[bool] = True
    recent: float = param(0.5, "fraction of the budget reserved for the most recent tokens")

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")

    def recent_tokens(self, budget: int) -> int:
        return int(budget * self.recent)

    def score(self, view: KVView) -> Tensor:
        return view.key_mass
