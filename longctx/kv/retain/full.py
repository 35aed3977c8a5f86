"""``full``: keep every token (the baseline every other method is measured against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longctx.kv.registry import register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "full")
@dataclass(frozen=True)
class Full(RetainPolicy):
    """Keep every token: the full cache."""

    evicts: ClassVar[bool] = False

    def score(self, view: KVView) -> Tensor:
        return view.positions.float()
