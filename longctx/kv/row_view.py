"""What a gathered layer of rows looks like (:class:`RowView`) and what rows need of a quant method
(:class:`QuantCodec`): the types :mod:`longctx.kv.rows` and :mod:`longctx.kv.rows_quant` share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class RowView:
    """One layer's rows of one sequence, gathered into padded dense tensors (copies).

    k, v: [num_kv_heads, max_len, head_dim]; pos: [num_kv_heads, max_len] original
    positions; score: [num_kv_heads, max_len] policy statistic; valid: [num_kv_heads, max_len]
    bool (False on padding); lengths: [num_kv_heads] int64; slots: [num_kv_heads, max_len]
    flat slot index of each entry in the pool (padding points into the null block).
    qslots: [num_kv_heads, max_len] flat slot of each quantized entry in the quantized pool, -1 for
    fp entries and padding (whose ``slots`` then point into the null block for quantized entries);
    None when no entry of the layer is quantized.
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor
    lengths: Tensor
    slots: Tensor
    qslots: Tensor | None = None


class QuantCodec(Protocol):
    """What rows need of a quant method (see ``kv.quant.kivi``)."""

    residual: int  # most recent tokens of a row kept in full precision

    def tokens_per_block(self, block_size: int) -> int:
        """Tokens in one quantized block (a multiple of ``block_size``)."""
        ...

    def fields(self, head_dim: int, tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-block tensors of a quantized block: name -> (shape without the block dim, dtype)."""
        ...

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """k, v [n, tokens, head_dim] -> the fields of n blocks."""
        ...

    def decode(self, data: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The fields of n blocks -> k, v [n, tokens, head_dim] in ``dtype``."""
        ...
