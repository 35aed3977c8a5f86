"""``tova``: evict the token the current query attends to least (Oren et al., arXiv:2401.06104)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "tova")
@dataclass(frozen=True)
class TOVA(RetainPolicy):
    """Keep the tokens with the highest attention from the latest query (averaged over heads)."""

    query_window: ClassVar[int] = 1
    per_head: bool = param(True, "score each kv-head separately (false: average over all heads of the layer)")

    def scores_rows_independently(self) -> bool:
        return self.per_head  # otherwise a row's score averages its layer's heads

    def score(self, view: KVView) -> Tensor:
        probs = view.window_attention()[:, :, -1]  # [num_kv_heads, group, max_len]
        per_row = probs.mean(dim=1)
        return per_row if self.per_head else per_row.mean(dim=0, keepdim=True).expand_as(per_row)
