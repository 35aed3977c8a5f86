"""``snapkv``: keep what the last window of queries attends to, pooled (Li et al., arXiv:2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "snapkv")
@dataclass(frozen=True)
class SnapKV(RetainPolicy):
    """Score tokens by attention from the last `window` queries, pooled over `kernel` neighbours."""

    window: int = param(32, "observation window: number of latest queries whose attention scores tokens")
    kernel: int = param(5, "1-D pooling kernel over token scores (odd; 1 = no pooling)")
    pooling: str = param("max", "pooling kind: max or avg")

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 1, got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")

    def window_size(self) -> int:
        return self.window

    def recent_tokens(self, budget: int) -> int:
        return self.window

    def score(self, view: KVView) -> Tensor:
        mass = view.window_attention().sum(dim=(1, 2))  # [num_kv_heads, max_len]
        if self.kernel == 1:
            return mass
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        return pool(mass[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
