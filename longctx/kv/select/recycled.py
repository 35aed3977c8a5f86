"""``recycled``: Recycled Attention (Xu, Goyal and Choi, "Recycled Attention: Efficient inference for long-context
language models", arXiv:2411.05787; v2 "RefreshKV").

Decoding alternates between full attention steps and recycled steps. A full step reads every token and records,
per layer and kv-head row, the ``tokens`` tokens with the highest attention probabilities (the paper's top-K of
the attention pattern; here summed over the query heads of the row's GQA group, ties to the earlier token). The
next ``stride - 1`` steps reuse that pattern: they read only the recorded tokens plus every token added since the
full step (the newest always among them), with no extra local window (the paper's method keeps none; its
StreamingLLM++ baseline does). Defaults are the paper's main RULER setting, K = 4096 and a fixed schedule with
stride S = 50 (its language-modelling runs also use K = 2048 with S = 10).

A sequence takes a full step when it has no record for the layer (its first decode step, or its rows were
compacted and the engine cleared its state) or ``stride`` steps have passed since the layer's last full step
(``state.steps``, host ints). Sequences of one batch may be at different phases: the full rows of a mixed step
read every token through the token selection, the others their recycled tokens. Records live in
``state.per_seq[i][layer]``: ``tokens`` [H, K] int64 row indices (-1 = none), ``length`` [H] the row lengths at
the full step and ``step`` its host step number.

Scores are the model's attention probabilities (``state.scale`` and ``state.softcap``, set by the engine on both
paths; ``D ** -0.5`` without soft-cap when a caller leaves them unset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.select.base import PagedRows, Selection, SelectPolicy, SelectState
from longctx.kv.select.tidaldecode import group_attention_scores, top_tokens


@register("select", "recycled")
@dataclass(frozen=True)
class Recycled(SelectPolicy):
    """Full attention every ``stride`` steps; in between, read its top tokens plus the tokens added since."""

    stride: int = param(50, "decode steps from one full attention step to the next (1: every step is full)")
    tokens: int = param(4096, "tokens recorded per row at a full step (recycled steps add the tokens since)")

    stateful = True

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        tables = rows.block_tables
        bsz, h, cap = tables.shape
        n = cap * rows.block_size
        if self.tokens >= n:
            return None  # the budget covers every row of this step: read everything
        assert len(state.per_seq) == bsz and len(state.steps) == bsz, "recycled needs per_seq and steps per row"
        records = [d.get(layer) for d in state.per_seq]
        full = [r is None or not 0 < state.steps[i] - r["step"] < self.stride for i, r in enumerate(records)]
        full_rows = [i for i in range(bsz) if full[i]]
        rec_rows = [i for i in range(bsz) if not full[i]]
        dev = tables.device
        if full_rows:
            self._record(layer, q, rows, state, full_rows)
        if not rec_rows:
            return None
        rec = [records[i] for i in rec_rows]
        ridx = torch.tensor(rec_rows, device=dev)
        lengths = rows.lengths[ridx].long()  # [R, H]
        k = max(r["tokens"].shape[-1] for r in rec)
        recorded = torch.stack([torch.nn.functional.pad(r["tokens"], (0, k - r["tokens"].shape[-1]), value=-1)
                                for r in rec])  # [R, H, k]
        recorded = torch.where(recorded < lengths[:, :, None], recorded, -1)
        length0 = torch.stack([r["length"] for r in rec]).long()  # [R, H]
        since = max(state.steps[i] - r["step"] for i, r in zip(rec_rows, rec, strict=True))  # tokens added since
        new = lengths[:, :, None] - 1 - torch.arange(since, device=dev)  # [R, H, since], newest first
        new = torch.where(new >= length0[:, :, None], new, -1)
        tokens = torch.cat([recorded, new], dim=-1)
        if not full_rows:
            return Selection(tokens=tokens)
        width = max(n, tokens.shape[-1])
        out = torch.full((bsz, h, width), -1, dtype=torch.long, device=dev)
        fidx = torch.tensor(full_rows, device=dev)
        j = torch.arange(width, device=dev)[None, None, :]
        out[fidx] = torch.where(j < rows.lengths[fidx][:, :, None], j, -1)  # full rows: every token
        out[ridx, :, : tokens.shape[-1]] = tokens
        return Selection(tokens=out)

    def _record(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState, full_rows: list[int]) -> None:
        """Full step of ``full_rows``: record each row's top tokens by the step's attention probabilities."""
        if len(full_rows) < rows.block_tables.shape[0]:
            fidx = torch.tensor(full_rows, device=rows.block_tables.device)
            q, rows = q[fidx], PagedRows(rows.k, rows.v, rows.pos, rows.block_tables[fidx], rows.lengths[fidx])
        top = top_tokens(group_attention_scores(q, rows, state), rows.lengths, self.tokens, newest=False)
        lengths = rows.lengths.long().clone()
        for r, i in enumerate(full_rows):
            state.per_seq[i][layer] = {"tokens": top[r].clone(), "length": lengths[r].clone(), "step": state.steps[i]}
