"""Rows: one (sequence, layer, kv-head) of KV storage with its own length and blocks.

A :class:`RowSet` holds the rows of one sequence: ``num_layers × num_kv_heads``
rows, each a list of block ids in the shared :class:`~longctx.kv.pool.BlockPool`
and a length. Tokens inside a row are kept in order of their original
position; the pool records that position for every token. Because each row has
its own length, head-wise and layer-wise budgets free real blocks.

Layout of one row (block_size = 4, length 10)::

    blocks:  [b7]        [b2]        [b9]
    tokens:  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 .  .
                                          ^ next slot = blocks[10 // 4] * 4 + 10 % 4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.kv.pool import NULL_BLOCK, BlockPool


@dataclass
class RowView:
    """One layer's rows of one sequence, gathered into padded dense tensors (copies).

    k, v: [num_kv_heads, max_len, head_dim]; pos: [num_kv_heads, max_len] original
    positions; score: [num_kv_heads, max_len] policy statistic; valid: [num_kv_heads, max_len]
    bool (False on padding); lengths: [num_kv_heads] int64; slots: [num_kv_heads, max_len]
    flat slot index of each entry in the pool (padding points into the null block).
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor
    lengths: Tensor
    slots: Tensor


class RowSet:
    """The rows of one sequence: ``num_layers × num_kv_heads`` independently sized rows."""

    def __init__(self, pool: BlockPool, num_layers: int, num_kv_heads: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.blocks: list[list[list[int]]] = [[[] for _ in range(num_kv_heads)] for _ in range(num_layers)]
        self.lengths: list[list[int]] = [[0] * num_kv_heads for _ in range(num_layers)]

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return sum(len(b) for layer in self.blocks for b in layer)

    def bytes_held(self) -> int:
        """Bytes of K+V in the blocks these rows hold (whole blocks, as allocated)."""
        return self.num_blocks * self.pool.bytes_per_block

    def bytes_held_per_row(self) -> list[list[int]]:
        """[layer][kv_head] bytes held by each row."""
        return [[len(b) * self.pool.bytes_per_block for b in layer] for layer in self.blocks]

    def num_tokens(self) -> int:
        return sum(sum(layer) for layer in self.lengths)

    # ---- writing ----------------------------------------------------------------------------
    def _slot_table(self, layer: int, max_len: int) -> Tensor:
        """Flat pool slot of every index < max_len of every row of ``layer``: [num_kv_heads, max_len]."""
        bs = self.pool.block_size
        nb = (max_len + bs - 1) // bs
        table = torch.full((self.num_kv_heads, max(nb, 1)), NULL_BLOCK, dtype=torch.int64)
        for h, blocks in enumerate(self.blocks[layer]):
            if blocks:
                table[h, : min(len(blocks), nb)] = torch.tensor(blocks[:nb], dtype=torch.int64)
        idx = torch.arange(max_len)
        slots = table[:, idx // bs] * bs + idx % bs  # [num_kv_heads, max_len]
        return slots.to(self.pool.device)

    def _ensure_capacity(self, layer: int, head: int, length: int) -> None:
        bs = self.pool.block_size
        need = (length + bs - 1) // bs - len(self.blocks[layer][head])
        if need > 0:
            self.blocks[layer][head].extend(self.pool.allocate(need))

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Append tokens to every row of ``layer``: k/v [num_tokens, num_kv_heads, head_dim], pos [num_tokens]."""
        n = k.shape[0]
        if n == 0:
            return
        starts = self.lengths[layer]
        for h in range(self.num_kv_heads):
            self._ensure_capacity(layer, h, starts[h] + n)
        max_len = max(starts) + n
        slots_all = self._slot_table(layer, max_len)
        offs = torch.tensor(starts, device=slots_all.device)[:, None] + torch.arange(n, device=slots_all.device)
        slots = slots_all.gather(1, offs).reshape(-1)  # [num_kv_heads * n]
        d = self.pool.head_dim
        self.pool.k.view(-1, d)[slots] = k.transpose(0, 1).reshape(-1, d).to(self.pool.dtype)
        self.pool.v.view(-1, d)[slots] = v.transpose(0, 1).reshape(-1, d).to(self.pool.dtype)
        self.pool.pos.view(-1)[slots] = pos.to(self.pool.device).repeat(self.num_kv_heads)
        self.pool.score.view(-1)[slots] = 0.0
        self.lengths[layer] = [s + n for s in starts]

    # ---- reading ----------------------------------------------------------------------------
    def gather(self, layer: int) -> RowView:
        """Copy ``layer``'s rows out of the pool into padded dense tensors."""
        lengths = torch.tensor(self.lengths[layer], dtype=torch.int64, device=self.pool.device)
        max_len = max(int(lengths.max()), 1)
        slots = self._slot_table(layer, max_len)
        d = self.pool.head_dim
        flat = slots.reshape(-1)
        h = self.num_kv_heads
        valid = torch.arange(max_len, device=self.pool.device)[None, :] < lengths[:, None]
        return RowView(
            k=self.pool.k.view(-1, d)[flat].view(h, max_len, d),
            v=self.pool.v.view(-1, d)[flat].view(h, max_len, d),
            pos=self.pool.pos.view(-1)[flat].view(h, max_len),
            score=self.pool.score.view(-1)[flat].view(h, max_len),
            valid=valid,
            lengths=lengths,
            slots=slots,
        )

    def write_scores(self, view: RowView, scores: Tensor) -> None:
        """Store a per-token statistic [num_kv_heads, max_len] for the valid entries of ``view``."""
        self.pool.score.view(-1)[view.slots[view.valid]] = scores[view.valid].float()

    # ---- eviction ---------------------------------------------------------------------------
    def compact(self, layer: int, view: RowView, keep: list[Tensor]) -> None:
        """Keep only ``keep[h]`` (sorted indices into row h of ``view``) and free surplus blocks.

        ``view`` must be a fresh gather of ``layer`` (its tensors are copies, so the
        in-place rewrite below cannot read what it has just overwritten).
        """
        bs = self.pool.block_size
        d = self.pool.head_dim
        for h, idx in enumerate(keep):
            n = int(idx.numel())
            old = self.lengths[layer][h]
            if n == old:
                continue
            idx = idx.to(view.k.device)
            dst = view.slots[h, :n]
            self.pool.k.view(-1, d)[dst] = view.k[h, idx]
            self.pool.v.view(-1, d)[dst] = view.v[h, idx]
            self.pool.pos.view(-1)[dst] = view.pos[h, idx]
            self.pool.score.view(-1)[dst] = view.score[h, idx]
            self.lengths[layer][h] = n
            keep_blocks = (n + bs - 1) // bs
            surplus = self.blocks[layer][h][keep_blocks:]
            del self.blocks[layer][h][keep_blocks:]
            self.pool.free(surplus)

    def release(self) -> None:
        """Return every block to the pool (request finished or preempted)."""
        for layer in self.blocks:
            for blocks in layer:
                self.pool.free(blocks)
                blocks.clear()
        self.lengths = [[0] * self.num_kv_heads for _ in range(self.num_layers)]
