"""Batched decode: one attention call per layer for every sequence of a decode step.

When every scheduled request feeds exactly one token and its KV method needs
nothing but the attention output (plain RoPE positions, no per-key attention
mass, no quantized rows, no sliding-window layers), the per-sequence loop of
:class:`~longctx.engine.context.BatchContext` is replaced by:

- host work once per step (:func:`prepare_decode`): room for the new token in
  every row, the slot each row writes, and device block tables patched
  incrementally (rebuilt only when eviction changed a row's blocks);
- per layer, pure tensor work (:class:`FastDecodeContext`): rotate q/k, write
  k/v into the pool, and paged decode attention straight over the pool's
  blocks (the Triton kernel on CUDA, its torch reference twin elsewhere) —
  no gather copy of the cache, no host synchronisation, so the step can be
  captured in a CUDA graph (``engine.cuda_graph``).

Retain policies still run after the step, per sequence, through the
reference path (eviction of layer l after step t only affects step t + 1, so
the result equals the per-layer order of the slow path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.sdpa import reference_forced
from longctx.kv.positions.base import PositionPolicy
from longctx.kv.sequence import SequenceKV
from longctx.model.config import ModelConfig
from longctx.model.rope import Rotary, rotate


def decode_attention_fn(device: torch.device):  # noqa: ANN201
    """The paged decode attention for ``device``: the Triton kernel on CUDA, a vectorised torch version
    elsewhere (both tested against ``paged_decode_attention_ref``, the oracle)."""
    from longctx.attention.triton import paged_decode  # noqa: PLC0415

    if device.type == "cuda" and paged_decode.HAS_TRITON:
        return paged_decode.paged_decode_attention
    return paged_decode_torch


def paged_decode_torch(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                       scale: float) -> Tensor:
    """Vectorised torch paged decode attention (gathers each row's blocks; fine for CPU and small caches).

    q [B, Hq, D]; k_pool/v_pool [num_blocks, block_size, D]; block_tables [B, H, max_blocks]; lengths [B, H].
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
    valid = torch.arange(used * bs, device=q.device)[None, None, :] < lengths[:, :, None]  # [B, H, L]
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return torch.matmul(p, v.float()).reshape(bsz, hq, d).to(q.dtype)


def can_fast_decode(seqs: list[SequenceKV], cfg: ModelConfig) -> bool:
    """Whether a decode step over ``seqs`` may take the batched path."""
    if reference_forced() or cfg.attn_logit_softcapping or any(t == "sliding_attention" for t in cfg.layer_types):
        return False
    if cfg.rope.rope_type == "dynamic":
        return False  # per-sequence frequency tables
    for s in seqs:
        p = s.positions
        if type(p).logits is not PositionPolicy.logits or not p.stores_rotated_keys:
            return False
        if p.rope_override(cfg.rope, cfg.max_position_embeddings) is not None:
            return False
        if s.retain.needs_key_mass or s.rows.quant is not None or s.defer_eviction:
            return False
    return True


@dataclass
class DecodeMetadata:
    """Device tensors of one batched decode step (L layers, B sequences, H kv-heads).

    slot_mapping [L, B*H] int64: flat pool slot each row writes its new token to;
    block_tables [L, B, H, max_blocks] int32; context_lens [L, B, H] int32 (including the new token);
    positions [B] int64: the new tokens' original positions.
    """

    slot_mapping: Tensor
    block_tables: Tensor
    context_lens: Tensor
    positions: Tensor


class DeviceTables:
    """A device copy of one RowSet's block tables [L, H, capacity] int32, patched incrementally."""

    def __init__(self) -> None:
        self.table: Tensor | None = None
        self.version = -1

    def get(self, seq: SequenceKV, added: list[tuple[int, int, int, int]], device: torch.device) -> Tensor:
        rows = seq.rows
        longest = max(len(b) for layer in rows.blocks for b in layer)
        if self.table is None or self.version != rows.version or longest > self.table.shape[-1]:
            cap = max(16, 1 << (max(longest, 1) - 1).bit_length())
            table = torch.zeros(rows.num_layers, rows.num_kv_heads, cap, dtype=torch.int32)
            for layer, heads in enumerate(rows.blocks):
                for h, blocks in enumerate(heads):
                    table[layer, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            self.table = table.to(device)
            self.version = rows.version
        elif added:
            idx = torch.tensor(added, dtype=torch.int64).T
            self.table[idx[0], idx[1], idx[2]] = idx[3].to(torch.int32).to(device)
        return self.table


def prepare_decode(seqs: list[SequenceKV], positions: list[int], device: torch.device) -> DecodeMetadata:
    """Host work of a decode step: room for one token per row, slots, block tables, lengths."""
    tables, slots, lens = [], [], []
    for seq in seqs:
        added = seq.rows.extend_for_decode(1)
        if not isinstance(seq.device_tables, DeviceTables):
            seq.device_tables = DeviceTables()
        tables.append(seq.device_tables.get(seq, added, device))
        bs = seq.rows.pool.block_size
        slots.append([[blocks[n // bs] * bs + n % bs for blocks, n in zip(bl, ln, strict=True)]
                      for bl, ln in zip(seq.rows.blocks, seq.rows.lengths, strict=True)])
        lens.append([[n + 1 for n in ln] for ln in seq.rows.lengths])
    cap = max(t.shape[-1] for t in tables)
    if len(tables) == 1:
        block_tables = tables[0][:, None]
    else:
        block_tables = torch.stack([torch.nn.functional.pad(t, (0, cap - t.shape[-1])) for t in tables], dim=1)
    slot_mapping = torch.tensor(slots, dtype=torch.int64).permute(1, 0, 2).reshape(len(seqs[0].rows.blocks), -1)
    context_lens = torch.tensor(lens, dtype=torch.int32).permute(1, 0, 2)
    return DecodeMetadata(
        slot_mapping=slot_mapping.to(device, non_blocking=True),
        block_tables=block_tables,
        context_lens=context_lens.contiguous().to(device, non_blocking=True),
        positions=torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True),
    )


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

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        meta, cfg = self.meta, self.cfg
        key = (rotary.rope, q.dtype)
        if key not in self._tables:  # same positions and RoPE for every layer of a type: compute once per step
            self._tables[key] = rotary.tables(meta.positions, q.dtype)  # cos/sin [B, D]
        cos, sin = self._tables[key]
        q_rot = rotate(q, cos[:, None], sin[:, None])  # [B, Hq, D]
        k_rot = rotate(k, cos[:, None], sin[:, None])  # [B, Hkv, D]
        pool = self.seqs[0].rows.pool
        d = cfg.head_dim
        slots = meta.slot_mapping[layer]
        pool.k.view(-1, d)[slots] = k_rot.reshape(-1, d).to(pool.dtype)
        pool.v.view(-1, d)[slots] = v.reshape(-1, d).to(pool.dtype)
        pool.pos.view(-1)[slots] = meta.positions.repeat_interleave(cfg.num_kv_heads)
        # pool.score is only read by key-mass policies, which never take this path: no reset needed.
        self.window_queries.append(q)
        self.rotaries.append(rotary)
        return self.attention_fn(q_rot, pool.k, pool.v, meta.block_tables[layer], meta.context_lens[layer], cfg.scale)

    def finish(self) -> None:
        """After the forward pass: count the new token in every row, remember the queries that
        query-window policies need, and let each sequence's retain policy evict."""
        cfg = self.cfg
        group = cfg.num_heads // cfg.num_kv_heads
        positions = self.meta.positions
        for i, seq in enumerate(self.seqs):
            seq.rows.lengths = [[n + 1 for n in ln] for ln in seq.rows.lengths]
            seq.stats.peak_bytes = max(seq.stats.peak_bytes, seq.rows.bytes_held())
            if seq.query_window:
                for layer, q in enumerate(self.window_queries):
                    # [H, G, 1, D]; cloned because q may be a CUDA-graph buffer overwritten by the next replay
                    qh = q[i].clone().view(cfg.num_kv_heads, group, 1, cfg.head_dim)
                    seq._remember_queries(layer, qh, positions[i : i + 1])
            seq.evict_after_decode(self.rotaries)
