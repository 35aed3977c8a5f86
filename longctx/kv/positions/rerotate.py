"""``rerotate``: kept tokens are moved to contiguous positions 0..n-1 (as StreamingLLM does in-cache).

Keys are stored raw and rotated at attention time at their rank in the row;
the query at row index i (its own token included) sits at position i. With no
eviction this is exactly native RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longctx.kv.positions.base import PositionPolicy, RotateFn
from longctx.kv.registry import register


@register("positions", "rerotate")
@dataclass(frozen=True)
class Rerotate(PositionPolicy):
    """Kept tokens get contiguous positions by order (positions re-assigned after eviction)."""

    stores_rotated_keys: ClassVar[bool] = False

    def logits(self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, lengths: Tensor,
               rotate: RotateFn) -> Tensor:
        num_heads, max_len = keys.shape[0], keys.shape[1]
        rank = torch.arange(max_len, device=keys.device).expand(num_heads, max_len)
        k_rot = rotate(keys, rank)  # [H, L, D]
        # Queries are the last tokens of their rows: the newest query sits at lengths - 1.
        tq = q.shape[2]
        newest = q_pos.max()
        q_rank = (lengths - 1)[:, None] - (newest - q_pos)[None, :]  # [H, Tq]
        q_rot = rotate(q, q_rank[:, None, :].expand(num_heads, q.shape[1], tq))
        return torch.matmul(q_rot, k_rot[:, None].transpose(-1, -2))
