"""The KV cache manager: how many pool blocks a request needs, reserved before the step that needs them.

The engine never lets a forward pass allocate. Before each step the scheduler
asks :meth:`KVCacheManager.allocate_slots` for room for every scheduled token
(``RowSet.reserve`` puts the blocks into the rows, so the forward finds them in
place); a ``False`` answer makes the scheduler preempt or wait instead of
failing mid-step.

Admission counts what a request's KV method will really hold. A request that
evicts (a retain policy with a budget) has a bounded peak: per row its budget
plus the larger of one prefill chunk (the whole prompt for dense prefill) and
the decode slack. That peak is *committed* when the request is admitted, so
compressed requests never force each other out; once its prompt is done, only
budget + slack stays committed, and the memory its prompt needed goes to the
next requests. A request that keeps everything (``full``, quantized or not) is
admitted when its whole prompt fits (so long prompts do not evict each other
while they prefill) and then grows step by step; when the pool runs dry, the
most recently admitted request is preempted and recomputed later.

Blocks are counted in fp blocks of the pool; quantized rows convert their
bytes at the pool's fp block size (both pools share one byte budget).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from longctx.errors import OutOfBlocksError
from longctx.kv.pool import BlockPool
from longctx.model.config import ModelConfig

if TYPE_CHECKING:
    from longctx.engine.request import Request


class KVCacheManager:
    """Reservations and admission over one :class:`BlockPool` (whose capacity is fixed at creation)."""

    def __init__(self, pool: BlockPool, cfg: ModelConfig, max_chunk_tokens: int) -> None:
        self.pool = pool
        self.cfg = cfg
        self.max_chunk_tokens = max_chunk_tokens

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def capacity_blocks(self) -> int:
        """Usable fp blocks of the pool (the null block excluded), quantized pools' bytes included."""
        return self.pool.max_blocks - 1

    @property
    def free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def held_blocks(self, req: Request) -> int:
        """fp blocks (quantized bytes converted) the request's rows hold now."""
        rows = req.kv.rows
        return rows.num_blocks + -(-rows.quant_bytes_held() // self.pool.bytes_per_block)

    # ---- reservation ----------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_tokens: int) -> bool:
        """Reserve room for ``num_tokens`` more tokens in every row of ``req`` (and, for quantized rows,
        check that the quantization after the step finds its blocks). False, reserving nothing new, when
        the pool cannot supply them now."""
        rows = req.kv.rows
        fp_need = rows.blocks_needed(num_tokens)
        if fp_need > self.pool.num_free_blocks:
            return False
        if rows.quant is not None and rows.qpool is not None and not req.kv.defer_eviction:
            residual, qbs = rows.quant.residual, rows.quant_block_size
            need = sum(max(0, (n - q + num_tokens - residual) // qbs)
                       for ls, qs in zip(rows.lengths, rows.qlens, strict=True) for n, q in zip(ls, qs, strict=True))
            # checked before the fp blocks are taken (a refusal reserves nothing); both pools share one budget,
            # so bytes the fp pool's tensors grow into (by doubling) are not the quantized pool's any more
            pool = self.pool
            shortfall = fp_need - len(pool.free_blocks)
            grown = 0
            if shortfall > 0:
                grown = min(max(2 * pool.num_blocks, pool.num_blocks + shortfall), pool._cap_blocks()) - pool.num_blocks
            taken = -(-grown * pool.bytes_per_block // rows.qpool.bytes_per_block)
            if need and not rows.qpool.can_allocate(need + taken):
                return False
        try:
            rows.reserve(num_tokens)
        except OutOfBlocksError:
            return False
        return True

    # ---- what a request will hold ---------------------------------------------------------------
    def is_bounded(self, req: Request) -> bool:
        """Whether the request's spec evicts down to a budget (its peak is known at admission)."""
        return req.kv.layer_budgets is not None

    def peak_blocks(self, req: Request, horizon: int | None = None) -> int:
        """Most fp blocks the request can hold from now on: for an evicting spec, per row its budget + the
        decode slack, and while its prompt is not done the larger of that and one prefill chunk on top of
        the budget (the whole prompt for dense prefill); otherwise every token it may ever hold (or, with
        ``horizon``, its first ``horizon`` tokens)."""
        kv, cfg, bs = req.kv, self.cfg, self.pool.block_size
        total = req.num_prompt_tokens + req.params.max_tokens if horizon is None else horizon
        chunk = kv.chunk_size or req.num_prompt_tokens
        prompt_done = req.num_computed_tokens >= req.num_prompt_tokens
        heads = cfg.num_kv_heads
        blocks = 0

        def row_peak(b: int | None, layer: int) -> int:
            if b is None:
                row = total
            else:
                row = b + kv.budget.slack + 1
                if not prompt_done:
                    row = max(row, b + chunk if kv.chunk_size else chunk)
                row = min(total, row)
            window = cfg.window_of(layer)
            if window is not None:  # rows are trimmed back to the window after every step
                row = min(row, window + bs + min(self.max_chunk_tokens, chunk))
            return row

        for layer in range(cfg.num_layers):
            row = row_peak(None if kv.layer_budgets is None else kv.layer_budgets[layer], layer)
            if kv.layer_budgets is not None and kv.budget.uses_scores:
                layer_blocks = math.ceil(heads * row / bs) + heads  # heads of a layer split its budget unevenly
            elif kv.layer_budgets is not None and kv.budget.needs_head_scores:  # a fixed budget per kv-head
                layer_blocks = sum(math.ceil(row_peak(b, layer) / bs) for b in kv.head_budgets[layer])
            else:
                layer_blocks = heads * math.ceil(row / bs)
            blocks += layer_blocks
        if kv.rows.quant is not None:
            blocks = self._quantized_blocks(req, blocks)
        return blocks

    def _quantized_blocks(self, req: Request, fp_blocks: int) -> int:
        """``fp_blocks`` of tokens stored mostly quantized: the fp residual (+ one quantized block being
        filled and one chunk) per row at fp size, the rest at the quantized size."""
        rows, bs = req.kv.rows, self.pool.block_size
        assert rows.quant is not None and rows.qpool is not None
        num_rows = self.cfg.num_layers * self.cfg.num_kv_heads
        chunk = min(req.kv.chunk_size or req.num_prompt_tokens, self.max_chunk_tokens)
        fp_row = rows.quant.residual + rows.quant_block_size + chunk
        fp = min(fp_blocks, num_rows * math.ceil(fp_row / bs))
        rest_tokens = (fp_blocks - fp) * bs
        qbytes = math.ceil(rest_tokens / rows.quant_block_size) * rows.qpool.bytes_per_block
        partial = num_rows if rest_tokens else 0  # a partly used quantized block per row
        return fp + -(-qbytes // self.pool.bytes_per_block) + partial

    def committed_blocks(self, running: list[Request]) -> int:
        """Blocks running requests may still take without a preemption: an evicting request up to its peak,
        any other request until the end of its prefill (its prompt was admitted whole)."""
        return sum(max(0, self.admitted_blocks(r) - self.held_blocks(r)) for r in running
                   if self.is_bounded(r) or r.is_prefill)

    def admitted_blocks(self, req: Request) -> int:
        """What admitting ``req`` commits: its peak (evicting specs) or its whole prefill plus one token
        (others, which then grow step by step). Admitting a growing request on its first chunk alone would let
        many long prompts in at once, only to preempt each other over and over while they prefill."""
        return self.peak_blocks(req) if self.is_bounded(req) else self.peak_blocks(req, horizon=req.prefill_target + 1)

    def can_admit(self, req: Request, num_tokens: int, committed: int) -> bool:
        """Whether a waiting request may start (with a chunk of ``num_tokens``): what admitting it commits must
        fit in what is free and not committed to running requests."""
        free = self.pool.num_free_blocks - committed
        return max(self.admitted_blocks(req), req.kv.rows.blocks_needed(num_tokens)) <= free
