"""``razor``: RazorAttention (Tang et al., arXiv:2407.15891): retrieval heads keep every token; every other head
keeps the attention sinks, a recent window and one *compensation token*: the mean of the keys and of the values it
dropped, kept as one extra slot of the row.

Retrieval heads are the kv-heads with the highest *induction* scores (attention to the token after the earlier
occurrence of the current one) plus those with the highest *echo* scores (attention to that earlier occurrence),
from the copy-paste probe (``longctx heads score --method retrieval``; ``heads=auto`` runs it on the loaded model
and caches it). The paper keeps 15% induction heads and 1% echo heads; those are the defaults. A file without
induction / echo statistics (a DuoAttention calibration) ranks rows by its ``scores`` and keeps the top
``induction + echo`` fraction; ``threshold`` > 0 instead keeps every row whose ``scores`` reach it.

The compensation slot: when a streaming row is cut, the tokens between its sinks and its window (and the slot
already there, weighted by how many tokens it summarises) are averaged, in fp32, into one slot stored right after
the sinks, at the position of the newest token it summarises; the count per row lives in the request's state.
Attention then sees it as one ordinary key/value. The paper's formula is this average; rows of sliding-window
layers and quantized rows get no compensation slot (their cuts are plain sinks + window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from longctx.kv.budget.duo import HeadSplit, check_head_split
from longctx.kv.registry import param, register

if TYPE_CHECKING:
    from longctx.heads.store import HeadScores
    from longctx.model.config import ModelConfig


@register("budget", "razor")
@dataclass(frozen=True)
class Razor(HeadSplit):
    """RazorAttention: retrieval heads keep the full cache, the others sinks + window + one compensation token."""

    sinks: int = param(4, "attention-sink tokens a non-retrieval head keeps")
    window: int = param(256, "recent tokens a non-retrieval head keeps")
    induction: float = param(0.15, "fraction of kv-heads kept full by induction score")
    echo: float = param(0.01, "fraction of kv-heads kept full by echo score")
    threshold: float = param(0.0, "if > 0: retrieval heads are those whose score is >= threshold (fractions unused)")
    heads: str = param("auto", "head-score file (from `longctx heads score`), or auto: probe the loaded model")

    compensation_token: ClassVar[bool] = True
    extra_slots: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("induction", "echo"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def check_spec(cls, spec: Any) -> None:
        from longctx.errors import SpecError  # noqa: PLC0415

        check_head_split(cls, "razor", spec)
        if spec.quant.name != "none":
            raise SpecError("budget=razor stores a compensation slot in full precision; use it with quant=none")

    def scores(self, cfg: ModelConfig) -> HeadScores:
        from longctx.heads.resolve import resolve_scores  # noqa: PLC0415
        from longctx.heads.retrieval import RetrievalSettings  # noqa: PLC0415

        return resolve_scores(self.heads, cfg, "retrieval", RetrievalSettings())

    def retrieval_rows(self, scores: HeadScores) -> list[list[bool]]:
        from longctx.heads.select import retrieval_mask  # noqa: PLC0415

        if self.threshold > 0:
            return retrieval_mask(scores.scores, self.threshold, 0.0)
        if "induction" not in scores.extra or "echo" not in scores.extra:
            return retrieval_mask(scores.scores, 0.0, self.induction + self.echo) if self.induction + self.echo \
                else [[False] * len(row) for row in scores.scores]
        out = [[False] * len(row) for row in scores.scores]
        for field, fraction in (("induction", self.induction), ("echo", self.echo)):
            if fraction > 0:
                mask = retrieval_mask(scores.extra[field], 0.0, fraction)
                out = [[a or b for a, b in zip(r, m, strict=True)] for r, m in zip(out, mask, strict=True)]
        return out

    def cut_rows(self, seq: Any, layer: int, view: Any, window: int | None) -> None:
        if window is not None or view.qslots is not None:
            super().cut_rows(seq, layer, view, window)
            return
        counts: dict[tuple[int, int], int] = seq.budget_state.setdefault("compensated", {})
        lengths, budgets = seq.rows.lengths[layer], seq.head_budgets[layer]
        keep = []
        changed = False
        for h, (n, b) in enumerate(zip(lengths, budgets, strict=True)):
            if n <= b:
                keep.append(torch.arange(n, device=view.k.device))
                continue
            changed = True
            keep.append(compensate_row(view, h, n, self.sinks, b - self.sinks - 1, counts, (layer, h)))
        if changed:
            seq.rows.compact(layer, view, keep)
            seq.stats.num_evictions += 1


def compensate_row(view: Any, h: int, n: int, sinks: int, window: int, counts: dict[tuple[int, int], int],
                   key: tuple[int, int]) -> torch.Tensor:
    """Indices row ``h`` of ``view`` keeps (sinks, the compensation slot, the last ``window``), writing the new
    compensation key / value into ``view`` at the slot's index (the newest dropped token's)."""
    had = counts.get(key, 0)
    s = min(sinks, n)
    lo = s + (1 if had else 0)  # first plain token after the sinks (and the old slot)
    tail = n - window  # first token of the window
    k_sum = view.k[h, lo:tail].float().sum(0)
    v_sum = view.v[h, lo:tail].float().sum(0)
    if had:
        k_sum += view.k[h, s].float() * had
        v_sum += view.v[h, s].float() * had
    total = had + (tail - lo)
    slot = tail - 1
    view.k[h, slot] = (k_sum / total).to(view.k.dtype)
    view.v[h, slot] = (v_sum / total).to(view.v.dtype)
    view.score[h, slot] = 0.0
    counts[key] = total
    dev = view.k.device
    return torch.cat([torch.arange(s, device=dev), torch.tensor([slot], device=dev), torch.arange(tail, n, device=dev)])
