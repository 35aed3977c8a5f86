"""``headkv``: HeadKV (Fu et al., arXiv:2410.19258): per-(layer, kv-head) budgets in proportion to head scores.

Every head keeps a floor of ``base - base / beta`` tokens; the rest of the budget (``base / beta`` per head) is a
pool split across heads in proportion to their retrieval scores (``heads=FILE`` or ``auto``: the copy-paste probe
of the loaded model, cached), within each layer (``scope=layer``) or across the whole model (``scope=global``, as
in the paper). ``beta`` = 1.005 is the authors' public default. Which tokens a head keeps is the retain policy's
choice (HeadKV pairs this with SnapKV-style selection: ``retain=snapkv``). The paper's best variant scores heads
by retrieval *and reasoning* (HeadKV-R2); the probe here gives retrieval scores only (HeadKV-R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from longctx.kv.budget.base import BudgetAllocator
from longctx.kv.registry import param, register

if TYPE_CHECKING:
    from longctx.model.config import ModelConfig


@register("budget", "headkv")
@dataclass(frozen=True)
class HeadKV(BudgetAllocator):
    """HeadKV: a layer's (or the model's) budget split across kv-heads in proportion to their retrieval scores."""

    heads: str = param("auto", "head-score file (from `longctx heads score`), or auto: probe the loaded model")
    beta: float = param(1.005, "each head keeps base - base/beta tokens; the rest is shared by score")
    scope: str = param("layer", "layer: split each layer's budget across its heads; global: across all heads")

    needs_head_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1.0:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be layer or global, got {self.scope!r}")
        if not self.heads:
            raise ValueError("heads must be a file path or auto")

    def head_table(self, base: int, cfg: ModelConfig) -> list[list[int]] | None:
        from longctx.heads.resolve import resolve_scores  # noqa: PLC0415
        from longctx.heads.retrieval import RetrievalSettings  # noqa: PLC0415
        from longctx.heads.select import proportional_split  # noqa: PLC0415

        scores = resolve_scores(self.heads, cfg, "retrieval", RetrievalSettings()).scores
        layers = self.layer_budgets(base, cfg.num_layers)
        floors = [b - round(b / self.beta) for b in layers]
        heads = cfg.num_kv_heads
        if self.scope == "layer":
            return [proportional_split(b * heads, row, f) for b, row, f in zip(layers, scores, floors, strict=True)]
        flat = proportional_split(sum(layers) * heads, [s for row in scores for s in row], min(floors))
        return [flat[i * heads : (i + 1) * heads] for i in range(cfg.num_layers)]
