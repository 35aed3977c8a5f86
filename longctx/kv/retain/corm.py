"""``corm``: keep tokens that any recent query found important (Dai et al., arXiv:2404.15949)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "corm")
@dataclass(frozen=True)
class CORM(RetainPolicy):
    """Score a token by the largest attention any of the last `window` queries gave it."""

    window: int = param(32, "number of recent queries consulted (adjacent queries are similar)")

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def window_size(self) -> int:
        return self.window

    def recent_tokens(self, budget: int) -> int:
        return min(self.window, budget)

    def score(self, view: KVView) -> Tensor:
        probs = view.window_attention()  # [num_kv_heads, group, window, max_len]
        return probs.amax(dim=(1, 2))
