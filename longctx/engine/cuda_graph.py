"""CUDA-graph replay of the batched decode step (``engine.fast_decode``).

A decode step at small batch is bound by kernel-launch overhead, not by the
GPU. The whole model forward of a batched decode step plus the LM head is
captured once per (batch size, block-table capacity) into a CUDA graph that
reads static input buffers; each step copies the step's token ids and decode
metadata into those buffers and replays. Graphs share one memory pool. The KV
pool's tensors must stay put while graphs exist (the runner drops all graphs
if the pool grew; ``LLM(preallocate_kv=True)`` avoids growth).

A serving batch changes size nearly every step, so steps whose rows carry no per-row captured state (no
select method narrowing reads, no quantized prefix) run in the graph of the next batch bucket
(:func:`graph_batch`: 1, 2, 4, 8, then multiples of 8): the padding rows have empty tables, write their
token into the null block (never read) and their logits are dropped. Without buckets every new batch size
paid a capture (two warm-up forwards and a capture, ~100 ms at 8B), which dominated decode at batch ~30.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.engine.fast_decode import DecodeMetadata, FastDecodeContext
from longctx.engine.select_step import select_key
from longctx.kv.pool import BlockPool
from longctx.kv.sequence import SequenceKV
from longctx.model.decoder import CausalLM


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: Tensor
    meta: DecodeMetadata
    ctx: FastDecodeContext
    logits: Tensor


def graph_batch(b: int) -> int:
    """The captured batch size a step of ``b`` rows runs in: 1, 2, 4, 8, then the next multiple of 8."""
    return b if b <= 2 else 4 if b <= 4 else -(-b // 8) * 8


class DecodeGraphs:
    """Captured decode steps keyed by (batch size, block-table capacity, quantized codec + pool + table capacity)."""

    def __init__(self, model: CausalLM, attention_fn) -> None:  # noqa: ANN001
        self.model = model
        self.attention_fn = attention_fn
        self.graphs: dict[tuple, _Graph] = {}
        self.pool_handle = None
        self.pool_ptr: tuple[int, ...] | None = None

    def invalidate_if_moved(self, pool: BlockPool) -> None:
        """Drop every graph if a pool tensor they read was reallocated (the fp pool or a quantized pool grew)."""
        ptrs = (pool.k.data_ptr(), pool.v.data_ptr(), pool.pos.data_ptr(),
                *(() if pool.summary is None else (pool.summary.data_ptr(),)),
                *(t.data_ptr() for qp in pool.quant_pools.values() for t in (*qp.data.values(), qp.alive)))
        if self.pool_ptr is not None and self.pool_ptr != ptrs:
            self.graphs.clear()
            self.pool_handle = None  # a released graph pool must not be reused
        self.pool_ptr = ptrs

    def run(self, seqs: list[SequenceKV], ids: Tensor, meta: DecodeMetadata) -> tuple[Tensor, FastDecodeContext]:
        """Replay (capturing first if needed) the decode step for ``meta``; returns (logits, context)."""
        self.invalidate_if_moved(seqs[0].rows.pool)
        rows = seqs[0].rows
        quant = None  # the codec and its pool are baked into the kernel launches of a captured step
        if meta.quant_tables is not None:
            quant = (rows.quant, id(rows.qpool), meta.quant_tables.shape[-1])
        b = ids.shape[0]
        select = select_key(seqs)
        # padding rows only where no per-row state is baked into the graph (select methods, quantized prefixes)
        size = graph_batch(b) if quant is None and select is None else b
        key = (size, meta.block_tables.shape[-1], quant, select)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(seqs, *_padded(ids, meta, size))
            self.graphs[key] = g
        g.ids[:b].copy_(ids)
        g.meta.block_tables[:, :b].copy_(meta.block_tables)
        g.meta.lengths[:, :b].copy_(meta.lengths)
        g.meta.positions[:b].copy_(meta.positions)
        if size > b:  # padding rows: empty (an earlier step may have left a real row's table there)
            for t in (g.ids, g.meta.positions):
                t[b:].zero_()
            for t in (g.meta.block_tables, g.meta.lengths):
                t[:, b:].zero_()
        g.meta.host_positions = meta.host_positions
        if meta.quant_tables is not None:
            g.meta.quant_tables.copy_(meta.quant_tables)
            g.meta.quant_counts.copy_(meta.quant_counts)
        g.graph.replay()
        g.ctx.seqs = seqs
        return (g.logits if size == b else g.logits[:b]), g.ctx

    def _capture(self, seqs: list[SequenceKV], ids: Tensor, meta: DecodeMetadata) -> _Graph:
        """Capture the step for ``ids`` / ``meta`` (possibly padded past ``seqs`` with empty rows)."""
        static_ids = ids.clone()
        quant = (t.clone() if t is not None else None for t in (meta.quant_tables, meta.quant_counts))
        static = DecodeMetadata(meta.block_tables.clone(), meta.lengths.clone(), meta.positions.clone(),
                                meta.block_size, meta.host_positions, *quant)
        # Warm up on a side stream (Triton compiles, allocator settles), writing only the slots this step
        # writes anyway, so the cache content stays right.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                ctx = FastDecodeContext(seqs, static, self.model.config, self.attention_fn)
                self.model.compute_logits(self.model(static_ids, ctx))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        ctx = FastDecodeContext(seqs, static, self.model.config, self.attention_fn)
        with torch.cuda.graph(graph, pool=self.pool_handle):
            logits = self.model.compute_logits(self.model(static_ids, ctx))
        if self.pool_handle is None:
            self.pool_handle = graph.pool()
        return _Graph(graph, static_ids, static, ctx, logits)


def _padded(ids: Tensor, meta: DecodeMetadata, size: int) -> tuple[Tensor, DecodeMetadata]:
    """``ids`` and ``meta`` with empty rows appended up to ``size`` rows (block tables of the null block,
    no tokens, position 0)."""
    pad = size - ids.shape[0]
    if pad == 0:
        return ids, meta
    f = torch.nn.functional.pad
    return f(ids, (0, pad)), DecodeMetadata(f(meta.block_tables, (0, 0, 0, 0, 0, pad)), f(meta.lengths, (0, 0, 0, pad)),
                                            f(meta.positions, (0, pad)), meta.block_size, meta.host_positions)
