"""The attention context of one forward pass over a packed batch of sequences.

Set up by the runner for exactly one forward call; each decoder layer calls
:meth:`BatchContext.attend`, which slices the packed tokens per sequence and
hands them to that sequence's :class:`~longctx.kv.sequence.SequenceKV` (each
sequence may run a different KV method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        outs = []
        # with several sequences, the evictions that can be stacked run together after the last one (one
        # gather, scoring, selection and rewrite per group instead of per sequence); each sequence's own rows
        # only, so the result is the same as evicting inside each sequence's step
        deferred: list | None = [] if len(self.seqs) > 1 and self.max_positions is not None else None
        for i, seq in enumerate(self.seqs):
            s, e = self.cu_seqlens[i], self.cu_seqlens[i + 1]
            max_pos = self.max_positions[i] if self.max_positions is not None else None
            outs.append(seq.attend_layer(layer, q[s:e], k[s:e], v[s:e], self.positions[s:e], rotary,
                                         self.is_prefill[i], max_pos, deferred))
        if deferred:
            evict_due(deferred, rotary)
        return torch.cat(outs) if len(outs) > 1 else outs[0]
