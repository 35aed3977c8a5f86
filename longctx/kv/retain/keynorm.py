"""``keynorm``: keep tokens whose keys have the smallest L2 norm (Devoto et al., arXiv:2406.11430)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "keynorm")
@dataclass(frozen=True)
class KeyNorm(RetainPolicy):
    """Keep tokens with low key L2 norm (a cheap, attention-free baseline)."""

    num_sinks: int = param(0, "initial tokens always kept")
    recent: int = param(0, "most recent tokens always kept")

    def __post_init__(self) -> None:
        if self.num_sinks < 0 or self.recent < 0:
            raise ValueError("num_sinks and recent must be >= 0")

    @property
    def sinks(self) -> int:
        return self.num_sinks

    def recent_tokens(self, budget: int) -> int:
        return self.recent

    def score(self, view: KVView) -> Tensor:
        return -view.keys.float().norm(dim=-1)
