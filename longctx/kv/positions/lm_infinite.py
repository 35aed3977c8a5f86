"""``lm_infinite``: Λ-shaped attention and a distance cap (Han et al., arXiv:2308.16137).

Each query sees the first ``sinks`` tokens and the last ``window`` tokens; any
relative distance beyond ``max_distance`` is clamped to it (implemented by
rotating such keys and queries as if they sat exactly ``max_distance`` apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longctx.kv.positions.base import PositionPolicy, RotateFn
from longctx.kv.registry import param, register


@register("positions", "lm_infinite")
@dataclass(frozen=True)
class LMInfinite(PositionPolicy):
    """Λ-shaped mask (sinks + local window) with relative distances capped at max_distance."""

    stores_rotated_keys: ClassVar[bool] = False
    sinks: int = param(4, "starting tokens every query sees")
    window: int = param(2048, "local window every query sees")
    max_distance: int = param(2048, "relative distances are capped here (usually the trained context)")

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 1 or self.max_distance < 1:
            raise ValueError("sinks must be >= 0, window and max_distance >= 1")

    def logits(self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, lengths: Tensor,
               rotate: RotateFn) -> Tensor:
        near = torch.matmul(rotate(q, q_pos), rotate(keys, k_pos)[:, None].transpose(-1, -2))
        capped_q = torch.full_like(q_pos, self.max_distance)
        far = torch.matmul(rotate(q, capped_q), rotate(keys, torch.zeros_like(k_pos))[:, None].transpose(-1, -2))
        distance = q_pos[None, :, None] - k_pos[:, None, :]
        return torch.where((distance <= self.max_distance)[:, None], near, far)

    def extra_mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        distance = q_pos[None, :, None] - k_pos[:, None, :]
        return (k_pos[:, None, :] < self.sinks) | (distance < self.window)
