"""Batched decode: one attention call per layer for every sequence of a decode step.

When every scheduled request feeds exactly one token and its KV method needs
nothing but the attention output (plain RoPE positions, no per-key attention
mass; sliding-window layers and soft-capped logits through the kernels' window
and soft-cap; quantized rows on CUDA, through the kernel that dequantizes their
prefix, on full-attention models without soft-capping), the per-sequence loop of
:class:`~longctx.engine.context.BatchContext` is replaced by:

- host work once per step (:func:`prepare_decode`): room for the new token in
  every row and device block tables / row lengths (:class:`DeviceTables`:
  patched incrementally, rebuilt only when eviction or quantization changed a
  row's blocks, and prefetched for the next step while the GPU runs this one);
- per layer, pure tensor work (:class:`FastDecodeContext`): the slot each row
  writes (derived on the device), RoPE + k/v write into the pool (one fused
  kernel, ``ops.rope_kv_write``), and paged decode attention straight over the
  pool's blocks (the Triton kernels on CUDA, a torch twin elsewhere) — no gather
  copy of the cache, no host synchronisation, so the step can be captured in a
  CUDA graph (``engine.cuda_graph``).

Retain policies run after the step (eviction of layer l after step t only
affects step t + 1, so the result equals the per-layer order of the slow path):
the layers due for eviction are scored, selected and compacted as one stack of
rows (``SequenceKV._evict_stacked``) when the policy scores rows independently.
Quantized rows are re-quantized (``RowSet.settle``) after eviction, as the
per-sequence path does after each layer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from longctx.attention.sdpa import reference_forced
from longctx.device import tensor_on, to_device
from longctx.engine.select_step import SelectStep, narrows_reads, prepare_select
from longctx.kv.decode_eviction import evict_after_decode_batch
from longctx.kv.positions.base import PositionPolicy
from longctx.kv.rows import table_width
from longctx.kv.sequence import SequenceKV
from longctx.model.config import ModelConfig
from longctx.model.rope import Rotary
from longctx.ops.rope_kv_write import rope_kv_write


def decode_attention_fn(device: torch.device):  # noqa: ANN201
    """The paged decode attention for ``device``: the Triton kernel on CUDA, a vectorised torch version
    elsewhere (both tested against ``paged_decode_attention_ref``, the oracle)."""
    from longctx.attention.triton import paged_decode  # noqa: PLC0415

    if device.type == "cuda" and paged_decode.HAS_TRITON:
        return paged_decode.paged_decode_attention
    return paged_decode_torch


def paged_decode_torch(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                       scale: float, softcap: float | None = None, *, starts: Tensor | None = None) -> Tensor:
    """Vectorised torch paged decode attention (gathers each row's blocks; fine for CPU and small caches).

    q [B, Hq, D]; k_pool/v_pool [num_blocks, block_size, D]; block_tables [B, H, max_blocks]; lengths [B, H];
    ``softcap`` and ``starts`` (a sliding window's first visible token per row) as in the Triton kernel.
    """
    bsz, hq, d = q.shape
    hkv, max_blocks = block_tables.shape[1:]
    bs = k_pool.shape[1]
    used = max(1, int((int(lengths.max()) + bs - 1) // bs))
    table = block_tables[:, :, :used].long()
    k = k_pool[table].reshape(bsz, hkv, used * bs, d)  # [B, H, L, D]
    v = v_pool[table].reshape(bsz, hkv, used * bs, d)
    qg = q.view(bsz, hkv, hq // hkv, d).float()  # [B, H, G, D]
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, H, G, L]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    idx = torch.arange(used * bs, device=q.device)[None, None, :]
    valid = idx < lengths[:, :, None]  # [B, H, L]
    if starts is not None:
        valid = valid & (idx >= starts[:, :, None])
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return torch.matmul(p, v.float()).reshape(bsz, hq, d).to(q.dtype)


def can_fast_decode(seqs: list[SequenceKV], cfg: ModelConfig) -> bool:
    """Whether a decode step over ``seqs`` may take the batched path."""
    if reference_forced():
        return False
    sliding = any(t == "sliding_attention" for t in cfg.layer_types)
    if (sliding or cfg.attn_logit_softcapping) and any(s.rows.quant is not None for s in seqs):
        return False  # the quantized-prefix kernel takes no window and no soft-cap
    if cfg.rope.rope_type == "dynamic":
        return False  # per-sequence frequency tables
    for s in seqs:
        p = s.positions
        if type(p).logits is not PositionPolicy.logits or not p.stores_rotated_keys:
            return False
        if p.rope_override(cfg.rope, cfg.max_position_embeddings) is not None:
            return False
        if s.retain.needs_key_mass or s.defer_eviction:
            return False
    if narrows_reads(seqs) and any(s.rows.quant is not None for s in seqs):
        return False  # selection reads fp pool blocks; quantized rows select on the per-sequence path
    return _quant_ok(seqs)


def _quant_ok(seqs: list[SequenceKV]) -> bool:
    """Quantized rows decode in the batched path where the quantized-prefix kernel runs (CUDA with Triton),
    when every sequence shares one codec (one quantized pool) with kernel-friendly blocks."""
    codecs = {s.rows.quant for s in seqs}
    if codecs == {None}:
        return True
    if len(codecs) > 1 or len({id(s.rows.qpool) for s in seqs}) > 1:
        return False
    rows = seqs[0].rows
    qbs = rows.quant_block_size
    if rows.pool.device.type != "cuda" or getattr(rows.quant, "bits", None) not in (4, 8):
        return False
    from longctx.attention.triton import paged_decode  # noqa: PLC0415

    return paged_decode.HAS_TRITON and qbs >= 16 and qbs & (qbs - 1) == 0


@dataclass
class DecodeMetadata:
    """Device tensors of one batched decode step (L layers, B sequences, H kv-heads): the CUDA graph's inputs.

    block_tables [L, B, H, max_blocks] int32; lengths [L, B, H] int32: fp tokens in each row before this step
    (a quantized row's fp suffix; its quantized prefix is ``quant_tables`` / ``quant_counts``);
    positions [B] int64: the new tokens' original positions. The slot each row writes and the attended
    lengths are derived on the device (:attr:`slot_mapping`, :attr:`context_lens`), inside the graph.
    """

    block_tables: Tensor
    lengths: Tensor
    positions: Tensor
    block_size: int
    host_positions: list[int] | None = None  # the same positions on the host
    # quantized rows: [L, B, H, max_q] int32 quantized-block ids of each row's prefix, [L, B, H] int32 counts
    quant_tables: Tensor | None = None
    quant_counts: Tensor | None = None

    @property
    def slot_mapping(self) -> Tensor:
        """[L, B*H] int64: the flat pool slot each row writes its new token to."""
        bs = self.block_size
        blocks = self.block_tables.gather(-1, (self.lengths // bs).long().unsqueeze(-1)).squeeze(-1)  # [L, B, H]
        return (blocks.long() * bs + self.lengths % bs).reshape(self.lengths.shape[0], -1)

    @property
    def context_lens(self) -> Tensor:
        """[L, B, H] int32: tokens each row attends to, the new one included."""
        return self.lengths + 1


class DeviceTables:
    """Device copies of one sequence's block tables [L, H, capacity] int32 and row lengths [L, H] int32.

    The tables are rebuilt from the host lists only when the rows changed structurally (``RowSet.version``:
    quantization, a copy, a release); growth patches the new entries, and an eviction's cut (kept tokens fill
    each row's first blocks, which keep their ids) leaves the entries as they are. A table that runs out of
    capacity is padded on the device to the next power of two (a long row's table is never re-uploaded as it
    grows). The lengths advance on the device by one per decode step and are re-uploaded only when the host
    lengths differ from what those steps predict (a version change, an eviction, tokens fed by another path).
    """

    def __init__(self) -> None:
        self.table: Tensor | None = None
        self.version = -1
        self.lens: Tensor | None = None
        self.expected_tokens = -1
        self.qtable: Tensor | None = None  # quantized rows: [L, H, capacity] int32 quantized-block ids
        self.prefetched: tuple[tuple[int, int], tuple[Tensor, Tensor]] | None = None
        self.qcounts: Tensor | None = None  # [L, H] int32
        self.rows_reloaded = True  # rows changed other than by the batched step's own writes

    def prefetch(self, seq: SequenceKV, device: torch.device) -> None:
        """Do the next decode step's :meth:`step` now, while the GPU still runs this one (called after a
        step's launch); the next :meth:`step` takes the result if the rows have not changed since."""
        self.prefetched = None
        if not seq.rows.has_room_for(1):
            return  # allocating now would count blocks for a token that may never come (the request may stop)
        out = self.step(seq, device)
        self.prefetched = ((seq.rows.version, seq.rows.num_tokens()), out)

    def step(self, seq: SequenceKV, device: torch.device) -> tuple[Tensor, Tensor]:
        """Make room for one more token in every row (normally the KV cache manager already did, queueing the
        blocks it added in ``rows.added``, which are patched in here); returns (block tables, row lengths
        before the token) and advances the device lengths by one."""
        rows = seq.rows
        ready, self.prefetched = self.prefetched, None
        if ready is not None and not rows.added and ready[0] == (rows.version, rows.num_tokens()):
            return ready[1]
        if self.table is None or self.version != rows.version:
            # before the rows grow: right after a prefill every layer's host table is still cached
            per_layer = [rows.block_table_np(layer) for layer in range(rows.num_layers)]
            table = np.zeros((rows.num_layers, rows.num_kv_heads, table_width(max(t.shape[1] for t in per_layer))),
                             dtype=np.int32)
            for layer, t in enumerate(per_layer):
                table[layer, :, : t.shape[1]] = t
            self.table = to_device(torch.from_numpy(table), device, idle=True)
            self.version = rows.version
            rows.added.clear()  # the rebuilt table holds them (and entries queued before the change are stale)
            rows.track_added = True  # from now on blocks added by reserve are patched in
            self.lens = None
            self.rows_reloaded = True  # block summaries of these rows must be refreshed (engine.select_step)
            if rows.quant is not None:
                self._build_quant(rows, device)
        added = rows.extend_for_decode(1)
        if added:
            need = max(a[2] for a in added) + 1
            if need > self.table.shape[-1]:
                self.table = torch.nn.functional.pad(self.table, (0, table_width(need) - self.table.shape[-1]))
            idx = tensor_on(added, torch.int64, device, idle=True).T  # [4, n]: layer, head, index in row, block id
            self.table[idx[0], idx[1], idx[2]] = idx[3].to(torch.int32)
        tokens = rows.num_tokens()
        if self.lens is None or tokens != self.expected_tokens:
            fp = rows.lengths if rows.quant is None else [rows.fp_lengths(layer) for layer in range(rows.num_layers)]
            self.lens = tensor_on(fp, torch.int32, device, idle=True)
            self.rows_reloaded = True  # tokens came by another path
        lens = self.lens
        self.lens = lens + 1  # what the host lengths will be after this step (FastDecodeContext.finish)
        self.expected_tokens = tokens + rows.num_layers * rows.num_kv_heads
        return self.table, lens


    def _build_quant(self, rows, device: torch.device) -> None:  # noqa: ANN001
        longest = max(len(b) for layer in rows.qblocks for b in layer)
        table = np.zeros((rows.num_layers, rows.num_kv_heads, table_width(longest)), dtype=np.int32)
        for layer, heads in enumerate(rows.qblocks):
            for h, blocks in enumerate(heads):
                table[layer, h, : len(blocks)] = blocks
        self.qtable = to_device(torch.from_numpy(table), device, idle=True)
        self.qcounts = tensor_on([[len(b) for b in layer] for layer in rows.qblocks], torch.int32, device, idle=True)


def prepare_decode(seqs: list[SequenceKV], positions: list[int], device: torch.device) -> DecodeMetadata:
    """Host work of a decode step: room for one token per row; device block tables and lengths (no per-row
    host work unless a row needs a new block or the rows changed)."""
    tables, lens = [], []
    for seq in seqs:
        if not isinstance(seq.device_tables, DeviceTables):
            seq.device_tables = DeviceTables()
        table, n = seq.device_tables.step(seq, device)
        tables.append(table)
        lens.append(n)
    prepare_select(seqs, tables, lens)
    if len(tables) == 1:
        block_tables, lengths = tables[0][:, None], lens[0][:, None]  # [L, 1, H, cap], [L, 1, H]
    else:
        cap = max(t.shape[-1] for t in tables)
        block_tables = torch.stack([t if t.shape[-1] == cap else torch.nn.functional.pad(t, (0, cap - t.shape[-1]))
                                    for t in tables], dim=1)
        lengths = torch.stack(lens, dim=1)
    quant_tables = quant_counts = None
    if seqs[0].rows.quant is not None:
        dts = [seq.device_tables for seq in seqs]
        qcap = max(d.qtable.shape[-1] for d in dts)
        quant_tables = torch.stack([torch.nn.functional.pad(d.qtable, (0, qcap - d.qtable.shape[-1])) for d in dts],
                                   dim=1)  # [L, B, H, qcap]
        quant_counts = torch.stack([d.qcounts for d in dts], dim=1)  # [L, B, H]
    return DecodeMetadata(block_tables=block_tables, lengths=lengths,
                          positions=tensor_on(positions, torch.int64, device, idle=True),
                          block_size=seqs[0].rows.pool.block_size, host_positions=list(positions),
                          quant_tables=quant_tables, quant_counts=quant_counts)


class FastDecodeContext:
    """Attention context of a batched decode step (see module docstring)."""

    def __init__(self, seqs: list[SequenceKV], meta: DecodeMetadata, cfg: ModelConfig,
                 attention_fn) -> None:  # noqa: ANN001
        self.seqs = seqs
        self.meta = meta
        self.cfg = cfg
        self.attention_fn = attention_fn
        self.window_queries: list[Tensor] = []  # per layer raw q [B, Hq, D], for query-window policies
        self.rotaries: list[Rotary] = []
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._slots: tuple[Tensor, Tensor] | None = None  # (slot_mapping, context_lens), derived once per step
        self.select = SelectStep(seqs, meta.positions.device, cfg) if narrows_reads(seqs) \
            else None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        meta, cfg = self.meta, self.cfg
        key = (rotary.rope, q.dtype)
        if key not in self._tables:  # same positions and RoPE for every layer of a type: compute once per step
            self._tables[key] = rotary.tables(meta.positions, q.dtype)  # cos/sin [B, D]
        cos, sin = self._tables[key]
        pool = self.seqs[0].rows.pool
        # rotated q [B, Hq, D]; rotated k, v and positions written to the rows' slots (one kernel on CUDA)
        if self._slots is None:
            self._slots = (meta.slot_mapping, meta.context_lens)
        slot_mapping, context_lens = self._slots
        q_rot = rope_kv_write(q, k, v, cos, sin, pool.k, pool.v, pool.pos, slot_mapping[layer], meta.positions)
        if layer == 0 and self.select is not None:
            self.select.begin()  # whichever kind of layer comes first (a sliding one only counts)
        # pool.score is only read by key-mass policies, which never take this path: no reset needed.
        self.window_queries.append(q)
        self.rotaries.append(rotary)
        rows = self.seqs[0].rows
        if meta.quant_tables is not None and rows.quant is not None and rows.qpool is not None:
            from longctx.attention.triton.paged_decode_quant import (  # noqa: PLC0415
                QuantRows,
                paged_decode_attention_quant,
            )

            quant = QuantRows(rows.qpool.data, rows.qpool.alive, meta.quant_tables[layer], meta.quant_counts[layer],
                              rows.quant.bits, rows.quant.group, rows.quant.value_group(cfg.head_dim))
            return paged_decode_attention_quant(q_rot, pool.k, pool.v, meta.block_tables[layer], context_lens[layer],
                                                cfg.scale, quant)
        window = cfg.window_of(layer)
        if self.select is not None and window is None:
            return self.select.attend(layer, q_rot, pool, meta.block_tables[layer], context_lens[layer],
                                      slot_mapping[layer], cfg.scale, cfg.attn_logit_softcapping, self.attention_fn)
        if self.select is not None:
            self.select.count_full_layer(context_lens[layer], pool.k.element_size())
        starts = None if window is None else self._window_starts(layer, window, pool)
        return self.attention_fn(q_rot, pool.k, pool.v, meta.block_tables[layer], context_lens[layer], cfg.scale,
                                 cfg.attn_logit_softcapping, starts=starts)

    def _window_starts(self, layer: int, window: int, pool) -> Tensor:  # noqa: ANN001
        """[B, H] int32: per row, how many of its tokens fell out of the sliding window of the new query
        (position p sees keys at positions > p - window). Rows are in position order, so those tokens are a
        prefix; rows of sliding layers are trimmed after each step, so only their first blocks are read."""
        meta, bs = self.meta, self.meta.block_size
        tables = meta.block_tables[layer]  # [B, H, cap]
        width = min(tables.shape[-1], -(-(window + 2 * bs + 1) // bs))
        pos = pool.pos[tables[:, :, :width].long()].flatten(2)  # [B, H, width * bs]
        idx = torch.arange(width * bs, device=pos.device)
        inside = idx[None, None, :] < self._slots[1][layer][:, :, None]  # type: ignore[index]
        old = pos <= (meta.positions - window)[:, None, None]
        return (inside & old).sum(-1, dtype=torch.int32)

    def finish(self) -> None:
        """After the forward pass: count the new token in every row, remember the queries that
        query-window policies need, and let each sequence's retain policy evict."""
        positions = self.meta.positions
        host = self.meta.host_positions
        queries = query_pos = None
        for i, seq in enumerate(self.seqs):
            seq.rows.advance(1)
            seq.stats.peak_bytes = max(seq.stats.peak_bytes, seq.rows.bytes_held())
            if seq.query_window:
                if queries is None:  # [L, B, Hq, D]; copies, since q may be a CUDA-graph buffer the next replay reuses
                    queries, query_pos = torch.stack(self.window_queries), positions.clone()
                seq.remember_decode_queries(queries[:, i], query_pos[i : i + 1])
        if self.select is not None:
            self.select.finish(self.seqs)
        evict_after_decode_batch(self.seqs, self.rotaries, host)  # every sequence's policy, grouped
        for seq in self.seqs:
            if seq.rows.quant is not None:  # as after each layer step of the per-sequence path
                for layer in range(seq.rows.num_layers):
                    seq.rows.settle(layer)
            if isinstance(seq.device_tables, DeviceTables):
                seq.device_tables.prefetch(seq, seq.rows.pool.device)  # overlaps the running step
