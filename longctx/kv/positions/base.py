"""Positions policies: which RoPE positions queries and kept keys carry.

A positions policy decides (1) whether the rows store keys already rotated at
their original positions (``stores_rotated_keys``, the fast common case) or
raw, to be rotated at attention time, (2) the attention logits of a chunk of
queries against one layer's rows, (3) any extra mask (LM-Infinite's Λ shape)
and (4) an optional forced RoPE scaling. Rows always record each token's
original position, so causality and sliding windows are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longctx.model.config import RopeConfig

# rotate(x [..., n, head_dim], positions [..., n]) -> rotated x
RotateFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PositionPolicy:
    """Native RoPE: every token keeps its original position (the default)."""

    stores_rotated_keys: ClassVar[bool] = True

    def rope_override(self, rope: RopeConfig, max_position_embeddings: int) -> RopeConfig | None:
        """A replacement RoPE for every layer, or None to use the checkpoint's."""
        return None

    def keys_to_store(self, k: Tensor, pos: Tensor, rotate: RotateFn) -> Tensor:
        """k [num_tokens, num_kv_heads, head_dim] raw -> what the rows store."""
        if not self.stores_rotated_keys:
            return k
        return rotate(k.transpose(0, 1), pos[None, :]).transpose(0, 1)

    def logits(self, q: Tensor, q_pos: Tensor, keys: Tensor, k_pos: Tensor, lengths: Tensor,
               rotate: RotateFn) -> Tensor:
        """Unscaled logits [H, G, Tq, L] of raw queries q [H, G, Tq, D] at original positions q_pos [Tq]
        against stored keys [H, L, D] with original positions k_pos [H, L] and row lengths [H]."""
        q_rot = rotate(q, q_pos)
        return torch.matmul(q_rot, keys[:, None].transpose(-1, -2))

    def extra_mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """Optional bool [H, Tq, L] further restricting what queries see (True = visible)."""
        return None
