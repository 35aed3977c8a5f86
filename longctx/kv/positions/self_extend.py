"""``self_extend``: grouped positions beyond a neighbour window (Jin et al., arXiv:2401.01325).

Within ``window`` tokens a query sees normal relative positions; farther keys
get position floor(pos / group) and the query floor(q / group) + window -
window // group, so relative distances beyond the window shrink by ``group``
and stay inside the trained range. group = 1 is native RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longctx.kv.positions.base import PositionPolicy, RotateFn
from longctx.kv.registry import param, register


@register("positions", "self_extend")
@dataclass(frozen=True)
class SelfExtend(PositionPolicy):
    """Map relative distances beyond a neighbour window to floor(pos / group)."""

    stores_rotated_keys: ClassVar[bool] = False
    group: int = param(4, "group size for distant tokens (1 = native)")
    window: int = param(1024, "neighbour window keeping exact relative positions")

    def __post_init__(self) -> None:
        if self.group < 1 or self.window < 1:
            raise ValueError("group and window must be >= 1")

    def logits(self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, lengths: Tensor,
               rotate: RotateFn) -> Tensor:
        near = torch.matmul(rotate(q, q_pos), rotate(keys, k_pos)[:, None].transpose(-1, -2))
        if self.group == 1:
            return near
        shift = self.window - self.window // self.group
        q_far = torch.div(q_pos, self.group, rounding_mode="floor") + shift
        k_far = torch.div(k_pos, self.group, rounding_mode="floor")
        far = torch.matmul(rotate(q, q_far), rotate(keys, k_far)[:, None].transpose(-1, -2))
        distance = q_pos[None, :, None] - k_pos[:, None, :]  # [H, Tq, L]
        return torch.where((distance < self.window)[:, None], near, far)
