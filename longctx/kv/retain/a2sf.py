"""``a2sf``: H2O with a forgetting factor on the accumulated scores (Jo & Shin, arXiv:2407.20485)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "a2sf")
@dataclass(frozen=True)
class A2SF(RetainPolicy):
    """Accumulated attention, multiplied by a forgetting factor before each query's contribution."""

    needs_key_mass: ClassVar[bool] = True
    forget: float = param(0.9, "forgetting factor applied to the running score per query (1.0 = H2O)")
    recent: float = param(0.1, "fraction of the budget reserved for the most recent tokens")

    def __post_init__(self) -> None:
        if not 0.0 < self.forget <= 1.0:
            raise ValueError(f"forget must be in (0, 1], got {self.forget}")
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")

    @property
    def key_mass_decay(self) -> float:
        return self.forget

    def recent_tokens(self, budget: int) -> int:
        return int(budget * self.recent)

    def score(self, view: KVView) -> Tensor:
        return view.key_mass
