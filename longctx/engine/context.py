"""The attention context of one forward pass over a packed batch of sequences.

Set up by the runner for exactly one forward call; each decoder layer calls
:meth:`BatchContext.attend`, which slices the packed tokens per sequence and
hands them to that sequence's :class:`~longctx.kv.sequence.SequenceKV` (each
sequence may run a different KV method).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from longctx.engine.paged_prefill import attend_in_place, paged_prefill_enabled
from longctx.kv.decode_eviction import evict_due
from longctx.kv.sequence import SequenceKV
from longctx.model.rope import Rotary


@dataclass
class BatchContext:
    seqs: list[SequenceKV]
    cu_seqlens: list[int]  # [num_seqs + 1] offsets into the packed tokens
    positions: Tensor  # [num_tokens] original positions
    is_prefill: list[bool]
    max_positions: list[int] | None = None  # per sequence, the largest position fed (host copy: no sync)
    in_place: bool = field(default_factory=paged_prefill_enabled)  # read once per step, not per layer

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        outs = []
        # with several sequences, the evictions that can be stacked run together after the last one (one
        # gather, scoring, selection and rewrite per group instead of per sequence); each sequence's own rows
        # only, so the result is the same as evicting inside each sequence's step
        deferred: list | None = [] if len(self.seqs) > 1 and self.max_positions is not None else None
        if self.in_place:
            outs = self._attend_chunks_in_place(layer, q, k, v, rotary, deferred)
        else:
            for i, seq in enumerate(self.seqs):
                s, e = self.cu_seqlens[i], self.cu_seqlens[i + 1]
                max_pos = self.max_positions[i] if self.max_positions is not None else None
                outs.append(seq.attend_layer(layer, q[s:e], k[s:e], v[s:e], self.positions[s:e], rotary,
                                             self.is_prefill[i], max_pos, deferred))
        if deferred:
            evict_due(deferred, rotary)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _attend_chunks_in_place(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary,
                                deferred: list | None) -> list[Tensor]:
        """:meth:`attend` with the prompt chunks that need only their attention output attended in place, in
        one launch for all of them (``engine/paged_prefill.py``); the other sequences as before."""
        outs: list[Tensor | None] = [None] * len(self.seqs)
        ready: list[tuple[int, Tensor]] = []
        for i, seq in enumerate(self.seqs):
            s, e = self.cu_seqlens[i], self.cu_seqlens[i + 1]
            pos = self.positions[s:e]
            max_pos = self.max_positions[i] if self.max_positions is not None else None
            newest, rotate_at = seq.append_chunk(layer, k[s:e], v[s:e], pos, rotary, max_pos)
            if seq.paged_prefill_ready(layer, self.is_prefill[i]):
                ready.append((i, seq.paged_prefill_queries(layer, q[s:e], pos, rotate_at)))
            else:
                outs[i] = seq.attend_appended(layer, q[s:e], pos, rotate_at, newest, self.is_prefill[i], deferred)
        if ready:
            done = attend_in_place([self.seqs[i] for i, _ in ready], layer, [qr for _, qr in ready])
            for (i, _), out in zip(ready, done, strict=True):
                outs[i] = out
        return outs  # type: ignore[return-value]
