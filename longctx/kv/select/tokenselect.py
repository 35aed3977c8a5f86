"""``tokenselect``: TokenSelect (Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation
for LLMs via Dynamic Token-Level KV Cache Selection", arXiv:2411.02886): per-head soft voting over q·k picks the
tokens each step reads, and a Selection Cache reuses the choice while consecutive queries stay similar.

Per kv-head row and step:

- **Soft vote.** Each query head scores every token of the row by its dot product with the (rotated) key, turns
  the scores into a distribution with a softmax over the row, and the distributions are summed; the row reads
  its ``tokens`` tokens of highest vote (ties to the earlier token: a stable sort, the same choice on CPU and
  CUDA), always including the newest token. As in the authors' code (``patcher/token_retrieval.py``,
  ``get_topk_tokens``) the softmax is over the raw dot products (no 1/sqrt(D)). The paper votes over *all*
  query heads of the layer and every head then reads one shared token set (its KV slots are shared by the
  heads); here a row is one kv-head whose tokens may differ from the other heads' (per-head retain methods
  keep different tokens), so the vote is over the query heads of the row's GQA group and each row chooses its
  own set.
- **Selection Cache.** When the cosine similarity between the sequence's current query (all query heads of the
  layer, flattened, as in the paper) and the query of the last step that selected is above ``threshold``
  (0.9, the value in the authors' code), the step reuses that step's selection plus every token added to the
  row since (so the newest token is always read); otherwise it selects afresh and remembers its query. The
  decision is per sequence, made on the device (``torch.where`` over the batch); the cached indices, query and
  row lengths live in ``state.per_seq`` (cleared by the engine when the rows are compacted). A selection is
  reused for at most ``max_reuse`` new tokens (the tokens added since are read through a window of that size, a
  fixed shape); after that the step reselects.

A budget that covers every row of the step (``tokens >=`` the block tables' capacity) reads everything (None),
so the output is ``select=all``'s exactly.

Not as in the paper: its first ``n_init`` (128) and last ``n_local`` (512) tokens are always read besides the
``k`` chosen ones (``config/llama-token-retrieval.yaml``: top_k 2048); here only the newest token is forced and
``tokens`` counts everything chosen. The cosine is taken on rotated queries (the select call sees only those),
so consecutive queries are somewhat less similar than the paper's position-free ones. A reused step still
scores the row on this path (skipping it per sequence would need a host sync); ``extra_bytes_read`` counts what
a step that skips it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.select.base import PagedRows, Selection, SelectPolicy, SelectState
from longctx.kv.select.sparq import row_slots


@register("select", "tokenselect")
@dataclass(frozen=True)
class TokenSelect(SelectPolicy):
    """Per-head softmax votes over q·k choose the tokens; similar consecutive queries reuse the last choice."""

    tokens: int = param(2048, "tokens each row reads per step (the newest token included)")
    threshold: float = param(0.9, "reuse the last selection while the query's cosine similarity to it is above this")
    max_reuse: int = param(32, "most tokens added to a row while a selection is reused (then it reselects)")

    stateful = True

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1] (1: never reuse), got {self.threshold}")
        if self.max_reuse < 1:
            raise ValueError(f"max_reuse must be >= 1, got {self.max_reuse}")

    def _covers(self, rows: PagedRows) -> bool:
        return self.tokens >= rows.block_tables.shape[-1] * rows.block_size

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        bsz, hq, d = q.shape
        tables = rows.block_tables.long()
        _, h, cap = tables.shape
        bs = rows.block_size
        if len(state.per_seq) < bsz:
            state.per_seq.extend({} for _ in range(bsz - len(state.per_seq)))
        per_seq = state.per_seq[:bsz]
        key = ("tokenselect", layer)
        if self._covers(rows):
            for s in per_seq:  # a full step is no selection to reuse
                s.pop(key, None)
                s.pop(("tokenselect_reused", layer), None)
            return None
        dev = q.device
        num = self.tokens  # < cap * bs here
        lengths = rows.lengths.long()  # [B, H]
        slots, valid = row_slots(tables, lengths, bs)

        # soft vote over the group's query heads
        k = rows.k.reshape(-1, d)[slots].float()  # [B, H, L, D]
        qg = q.view(bsz, h, hq // h, d).float()
        logits = torch.matmul(qg, k.transpose(-1, -2)).masked_fill(~valid[:, :, None, :], float("-inf"))
        vote = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0).sum(2)  # [B, H, L]
        j = torch.arange(cap * bs, device=dev)[None, None, :]
        vote = vote.masked_fill(~valid, float("-inf")).masked_fill(j == (lengths - 1)[:, :, None], float("inf"))
        order = torch.sort(vote, dim=-1, descending=True, stable=True).indices[..., :num]  # [B, H, K]
        fresh = torch.where(order < lengths[:, :, None], order, -1)

        # selection cache: the last selecting step's query, indices and row lengths
        has = torch.tensor([key in s for s in per_seq], device=dev)
        prev_q = torch.stack([s[key][0] if key in s else torch.zeros(hq * d, device=dev) for s in per_seq])
        prev_tok = torch.stack([s[key][1] if key in s else torch.full((h, num), -1, device=dev) for s in per_seq])
        prev_len = torch.stack([s[key][2] if key in s else torch.zeros(h, dtype=torch.long, device=dev)
                                for s in per_seq])
        q_flat = q.reshape(bsz, hq * d).float()
        cos = torch.nn.functional.cosine_similarity(q_flat, prev_q, dim=-1, eps=1e-12)
        added = lengths - prev_len  # [B, H] tokens since the cached selection
        reuse = has & (cos > self.threshold) & ((added >= 0) & (added <= self.max_reuse)).all(-1)  # [B]

        w = self.max_reuse
        window = lengths[:, :, None] - w + torch.arange(w, device=dev)  # the last w token indices
        window = torch.where((window >= prev_len[:, :, None]) & (window >= 0), window, -1)
        reused = torch.cat([prev_tok, window], dim=-1)
        selected = torch.cat([fresh, torch.full_like(window, -1)], dim=-1)
        tokens = torch.where(reuse[:, None, None], reused, selected)  # [B, H, K + w]

        keep_q = torch.where(reuse[:, None], prev_q, q_flat)
        keep_tok = torch.where(reuse[:, None, None], prev_tok, fresh)
        keep_len = torch.where(reuse[:, None], prev_len, lengths)  # a new tensor: the engine's lengths may change
        for i, s in enumerate(per_seq):
            s[key] = (keep_q[i], keep_tok[i], keep_len[i])
            s[("tokenselect_reused", layer)] = reuse[i]
        return Selection(tokens=tokens)

    def extra_bytes_read(self, layer: int, rows: PagedRows, state: SelectState) -> Tensor | None:
        """The K bytes of the whole row on a step that selected (scoring reads every key); 0 on a reused step."""
        if self._covers(rows):
            return None
        bsz = rows.lengths.shape[0]
        full = rows.lengths.long() * rows.k.shape[-1] * rows.k.element_size()
        key = ("tokenselect_reused", layer)
        per_seq = state.per_seq[:bsz]
        if len(per_seq) < bsz or any(key not in s for s in per_seq):
            return full
        reused = torch.stack([s[key] for s in per_seq])  # [B]
        return torch.where(reused[:, None], 0, full)

