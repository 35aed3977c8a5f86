"""Block summaries for Quest-style selection: per pool block, the elementwise min and max of its valid keys.

The pool holds them as ``pool.summary`` [num_blocks, 2, D] (created the first time a sequence's select method
asks, grown with the pool). They are derived data, kept exact by two writers:

- the batched decode step, after its fused K/V write, recomputes the summary of every block it wrote into
  from that block's tokens (:func:`update_written`: block_size * D reads per row, inside the step, no sync);
- whenever a sequence's rows changed by another path (prefill, eviction and compaction, quantization,
  a fork, tokens fed by the per-sequence path), the step's host preparation refreshes every block of that
  sequence's rows from the pool (:func:`refresh_rows`: on CUDA the same kernel as the decode writes, over the
  last slot of every block of every layer, reading keys in place; no gather of the rows).

:func:`block_summaries_dense` is the direct computation both are tested against. Empty blocks summarise to
zeros (they are never selected: selection only ranks a row's ``ceil(length / block_size)`` blocks).
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_summaries_dense(kblocks: Tensor, counts: Tensor) -> Tensor:
    """[N, 2, D] min / max over the first ``counts[i]`` (clamped to [0, block_size]) tokens of kblocks[i]
    ([N, block_size, D]); zeros where a block holds no token."""
    bs = kblocks.shape[1]
    n = counts.long().clamp(0, bs)
    inside = (torch.arange(bs, device=kblocks.device)[None, :] < n[:, None])[..., None]  # [N, bs, 1]
    big = torch.finfo(kblocks.dtype).max
    kmin = torch.where(inside, kblocks, big).amin(1)
    kmax = torch.where(inside, kblocks, -big).amax(1)
    empty = (n == 0)[:, None]
    return torch.stack([kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0)], dim=1)


def ensure_summaries(pool) -> Tensor:  # noqa: ANN001
    """The pool's summary tensor, created (zeros) on first use."""
    if pool.summary is None:
        pool.summary = pool.k.new_zeros(pool.k.shape[0], 2, pool.k.shape[2])
    return pool.summary


def update_written(pool, slots: Tensor) -> None:  # noqa: ANN001
    """Recompute the summaries of the blocks holding the flat pool ``slots`` [N] just written (each row's
    newest token: its block holds ``slot % block_size + 1`` valid tokens)."""
    from longctx.attention.triton.quest_bound import update_block_summaries  # noqa: PLC0415

    if update_block_summaries(pool.k, pool.summary, slots):  # one kernel on CUDA
        return
    bs = pool.block_size
    blocks = slots // bs
    pool.summary[blocks] = block_summaries_dense(pool.k[blocks], slots % bs + 1)


def last_slots(tables: Tensor, lengths: Tensor, block_size: int) -> Tensor:
    """The flat pool slot of the last valid token of every block of the rows ``tables`` [..., cap] with
    ``lengths`` [...] tokens, flattened; entries past a row's blocks map to slot 0 (the null block)."""
    j = torch.arange(tables.shape[-1], device=tables.device)
    counts = (lengths.long()[..., None] - j * block_size).clamp(0, block_size)
    return torch.where(counts > 0, tables.long() * block_size + counts - 1, 0).reshape(-1)


def refresh_rows(pool, tables: Tensor, lengths: Tensor) -> None:  # noqa: ANN001
    """Recompute the summaries of every block of the rows ``tables`` [L, H, cap] with ``lengths`` [L, H]
    tokens (entries past a row's blocks are left alone). On CUDA one kernel reads the keys in place for all
    layers at once; elsewhere the dense twin runs one layer at a time (bounded temporaries)."""
    from longctx.attention.triton.quest_bound import update_block_summaries  # noqa: PLC0415

    bs = pool.block_size
    slots = last_slots(tables, lengths, bs)
    if not update_block_summaries(pool.k, pool.summary, slots):
        for layer in slots.view(tables.shape[0], -1):
            blocks = layer // bs
            pool.summary[blocks] = block_summaries_dense(pool.k[blocks], layer % bs + 1)
    pool.summary[0] = 0  # the null block (written by unused entries above) is never read
