"""``sparq``: SparQ Attention (Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference",
arXiv:2312.04985): approximate the scores from the query's largest components, attend exactly to the top
tokens, and give the weight left over to the row's mean value.

Per kv-head row and step:

1. The ``r`` components of largest |q| are chosen per GQA group (|q| summed over the group's query heads, as the
   authors' reference code does for GQA models, ``llminference/methods/ann_attention.py`` ``SparseQ``), so a row
   reads just those ``r`` columns of K for all its tokens. Per query head the approximate scores are
   ``ŝ = softmax(q[r] · K[:, r] / sqrt(D * ||q[r]||_1 / ||q||_1))`` over the row's tokens (the temperature corrects
   for the part of q left out).
2. The row reads the ``tokens`` tokens of largest ``sum_g ŝ_g`` (summed over the group's query heads) exactly;
   ties go to the earlier token (a stable sort: the same choice on CPU and CUDA).
3. Mean-value reallocation: with ``α_g = sum of ŝ_g over the chosen tokens`` the output of head g is
   ``α_g · attention(chosen) + (1 - α_g) · v̄``, v̄ the mean value of the row (``Selection.residual_weight = 1 - α``,
   ``residual_value = v̄``). A row whose every token is chosen gets weight 0 (plain attention).

v̄ is a running sum kept per sequence and layer (``state.per_seq``): initialised from the whole row when the state
is empty (a new sequence, or rows just compacted), then each step adds the newest token's value (index
``lengths - 1``); it assumes rows grow by one token per step between compactions (decode), as the reference's
``RunningVMean`` does.

Defaults: ``r=32`` (D/4 at head size 128; the paper sweeps r over D/8 .. D/2, its reference ``sparq-gpt-fast``
sets ``r = D / 8`` and ``k = L / 16`` from a compression ratio of 8) and ``tokens=1024`` (a fixed budget, the same
as ``quest``'s, rather than a fraction of the context). A budget that covers every row of the step (``tokens >=``
the block tables' capacity) reads everything (None), so the output is ``select=all``'s exactly; ``r >= D`` makes
ŝ the exact attention probabilities.

Not from the paper: the approximate scores ignore the model's attention scale and soft-cap (the select call does
not see them; the paper's 1/sqrt(D) temperature is used), and no local window is forced (the reference code's
``local_k``); the newest token is read only when it scores among the top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.select.base import PagedRows, Selection, SelectPolicy, SelectState


@register("select", "sparq")
@dataclass(frozen=True)
class SparQ(SelectPolicy):
    """Approximate scores from the r largest query components; read the top tokens, mix in the mean value."""

    r: int = param(32, "query components (per GQA group) used to approximate the scores; >= head size: exact")
    tokens: int = param(1024, "tokens each row reads exactly per step (the top of the approximate scores)")

    stateful = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1 (query components), got {self.r}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def _covers(self, rows: PagedRows) -> bool:
        return self.tokens >= rows.block_tables.shape[-1] * rows.block_size

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        bsz, hq, d = q.shape
        tables = rows.block_tables.long()
        _, h, cap = tables.shape
        bs = rows.block_size
        per_seq = _per_seq(state, bsz)
        key = ("sparq", layer)
        if self._covers(rows):
            for s in per_seq:  # the running mean is not kept on full steps: rebuilt from the rows next time
                s.pop(key, None)
            return None
        length = cap * bs
        lengths = rows.lengths.long()  # [B, H]
        slots, valid = row_slots(tables, lengths, bs)  # [B, H, L]
        r = min(self.r, d)
        g = hq // h

        qg = q.view(bsz, h, g, d).float()
        absq = qg.abs()
        comp = torch.sort(absq.sum(2), dim=-1, descending=True, stable=True).indices[..., :r]  # [B, H, r]
        q_r = qg.gather(-1, comp[:, :, None, :].expand(bsz, h, g, r))  # [B, H, G, r]
        k_r = rows.k.reshape(-1, d)[slots[..., None], comp[:, :, None, :]].float()  # [B, H, L, r]: r columns only
        total = absq.sum(-1)
        coverage = torch.where(total > 0, q_r.abs().sum(-1) / total.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        temp = (d * coverage).sqrt()  # [B, H, G]
        logits = torch.matmul(q_r, k_r.transpose(-1, -2)) / temp[..., None]  # [B, H, G, L]
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        s_hat = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)

        num = min(self.tokens, length)
        vote = s_hat.sum(2).masked_fill(~valid, float("-inf"))  # [B, H, L]
        order = torch.sort(vote, dim=-1, descending=True, stable=True).indices[..., :num]  # [B, H, K]
        chosen = order < lengths[:, :, None]
        tokens = torch.where(chosen, order, -1)
        alpha = (s_hat.gather(-1, order[:, :, None, :].expand(bsz, h, g, num)) * chosen[:, :, None, :]).sum(-1)
        weight = (1.0 - alpha).clamp(0.0, 1.0)
        weight = weight.masked_fill((lengths <= num)[:, :, None], 0.0)  # every token read: plain attention

        mean = self._running_mean(layer, rows, per_seq, slots, valid, lengths)
        return Selection(tokens=tokens, residual_weight=weight, residual_value=mean)

    def _running_mean(self, layer: int, rows: PagedRows, per_seq: list[dict], slots: Tensor, valid: Tensor,
                      lengths: Tensor) -> Tensor:
        """[B, H, D] fp32 mean value of each row, from the running sums in ``per_seq`` (updated in place)."""
        bsz, h = lengths.shape
        d = rows.v.shape[-1]
        v_flat = rows.v.reshape(-1, d)
        key = ("sparq", layer)
        fresh = [i for i, s in enumerate(per_seq) if key not in s]  # host-side: which sequences have no sums yet
        sums: list[Tensor | None] = [s[key][0] if key in s else None for s in per_seq]
        counts: list[Tensor | None] = [s[key][1] if key in s else None for s in per_seq]
        if fresh:
            idx = torch.tensor(fresh, device=lengths.device)
            full = (v_flat[slots[idx]].float() * valid[idx][..., None]).sum(2)  # [F, H, D]: the whole rows
            for j, i in enumerate(fresh):
                sums[i], counts[i] = full[j], lengths[i]
        vsum = torch.stack(sums)  # type: ignore[arg-type]
        n = torch.stack(counts)  # type: ignore[arg-type]
        newest = (lengths - 1).clamp(min=0)
        new_slot = slots.gather(-1, newest[:, :, None]).squeeze(-1)  # [B, H]
        grew = lengths > n  # one new token since the sums were taken (decode)
        vsum = vsum + v_flat[new_slot].float() * grew[..., None]
        read = torch.where(grew, 1, 0)
        if fresh:
            read[idx] = lengths[idx]
        covered = lengths.clone()  # a copy: the engine may update its lengths in place
        for i, s in enumerate(per_seq):
            s[key] = (vsum[i], covered[i])
            s[("sparq_v_read", layer)] = read[i]
        return vsum / lengths.clamp(min=1)[..., None]

    def extra_bytes_read(self, layer: int, rows: PagedRows, state: SelectState) -> Tensor | None:
        """The r columns of K of every token of each row (the approximate scores), plus the values added to the
        running mean (the whole row when it was initialised, else the newest token)."""
        if self._covers(rows):
            return None
        d = rows.k.shape[-1]
        k_bytes = rows.lengths.long() * min(self.r, d) * rows.k.element_size()
        key = ("sparq_v_read", layer)
        per_seq = state.per_seq[: rows.lengths.shape[0]]
        if len(per_seq) < rows.lengths.shape[0] or any(key not in s for s in per_seq):
            return k_bytes
        v_tokens = torch.stack([s[key] for s in per_seq])
        return k_bytes + v_tokens.long() * d * rows.v.element_size()


def _per_seq(state: SelectState, bsz: int) -> list[dict]:
    """The per-sequence dicts of the group (grown to B when a caller passed none)."""
    if len(state.per_seq) < bsz:
        state.per_seq.extend({} for _ in range(bsz - len(state.per_seq)))
    return state.per_seq[:bsz]


def row_slots(tables: Tensor, lengths: Tensor, bs: int) -> tuple[Tensor, Tensor]:
    """Pool slots [B, H, cap * bs] of every token index of each row (0 past the row) and which are inside it."""
    cap = tables.shape[-1]
    nblk = (lengths + bs - 1) // bs
    inside = torch.arange(cap, device=tables.device)[None, None, :] < nblk[:, :, None]
    blocks = torch.where(inside, tables, 0)
    slots = (blocks[..., None] * bs + torch.arange(bs, device=tables.device)).flatten(2)
    valid = torch.arange(cap * bs, device=tables.device)[None, None, :] < lengths[:, :, None]
    return torch.where(valid, slots, 0), valid
