"""``duo``: DuoAttention (Xiao et al., arXiv:2410.10819): retrieval heads keep the full cache, streaming heads
keep the attention sinks plus a recent window.

Which kv-heads are retrieval heads comes from a head-score file (``heads=FILE``, see ``longctx heads score``) or
from DuoAttention's calibration of the loaded model (``heads=auto``: run once, cached in the user cache).
Rows are per (layer, kv-head), so a streaming head really holds ``sinks + window`` tokens. The budget decides
what every row keeps by itself, so the retain axis stays ``full``. Defaults are the authors' public code's
(sinks 128, window 256, threshold 0.5 on the gates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from longctx.errors import SpecError
from longctx.kv.budget.base import BudgetAllocator
from longctx.kv.eviction import select_keep, select_keep_padded
from longctx.kv.registry import param, register

if TYPE_CHECKING:
    from longctx.heads.store import HeadScores
    from longctx.model.config import ModelConfig


def check_head_split(budget: Any, name: str, spec: Any) -> None:
    """Spec-level checks shared by ``duo`` and ``razor`` (they choose what rows keep: retain must be ``full``)."""
    if spec.retain.name != "full":
        raise SpecError(f"budget={name} decides what every row keeps (retrieval heads: all, streaming heads: "
                        f"sinks + window); leave retain at full, not retain={spec.retain.name}")


@dataclass(frozen=True)
class HeadSplit(BudgetAllocator):
    """Retrieval heads keep every token, streaming heads keep ``sinks`` + ``window`` (+ ``extra_slots``)."""

    heads: str = param("auto", "head-score file (from `longctx heads score`), or auto: calibrate the loaded model")
    sinks: int = param(128, "attention-sink tokens a streaming head keeps")
    window: int = param(256, "recent tokens a streaming head keeps")

    needs_head_scores: ClassVar[bool] = True
    cuts_rows: ClassVar[bool] = True
    extra_slots: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.slack < 0:
            raise ValueError(f"slack must be >= 0, got {self.slack}")
        if self.tokens or self.fraction:
            raise ValueError(f"tokens/fraction are not used by {type(self).method_name}: "  # type: ignore[attr-defined]
                             "streaming heads keep sinks + window, retrieval heads everything")
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"need sinks >= 0 and window >= 1, got sinks={self.sinks}, window={self.window}")
        if not self.heads:
            raise ValueError("heads must be a file path or auto")

    def base(self, prompt_len: int) -> int:
        return self.sinks + self.window + self.extra_slots

    def scores(self, cfg: ModelConfig) -> HeadScores:
        raise NotImplementedError

    def retrieval_rows(self, scores: HeadScores) -> list[list[bool]]:
        raise NotImplementedError

    def head_table(self, base: int, cfg: ModelConfig) -> list[list[int]] | None:
        from longctx.heads.select import FULL_ROW  # noqa: PLC0415

        mask = self.retrieval_rows(self.scores(cfg))
        streaming = self.sinks + self.window + self.extra_slots
        return [[FULL_ROW if r else streaming for r in row] for row in mask]

    def cut_rows(self, seq: Any, layer: int, view: Any, window: int | None) -> None:
        """Streaming rows over budget keep their first ``sinks`` and their last tokens (by position)."""
        lengths, budgets = seq.rows.lengths[layer], seq.head_budgets[layer]
        if all(n <= b for n, b in zip(lengths, budgets, strict=True)):
            return
        scores = view.pos.float().masked_fill(~view.valid, float("-inf"))
        recent = [0] * len(budgets)
        if view.qslots is None:
            seq.rows.compact_padded(layer, view, *select_keep_padded(scores, lengths, budgets, self.sinks, recent))
        else:
            seq.rows.compact(layer, view, select_keep(scores, lengths, budgets, self.sinks, recent))
        seq.stats.num_evictions += 1


@register("budget", "duo")
@dataclass(frozen=True)
class Duo(HeadSplit):
    """DuoAttention: retrieval heads keep the full cache, streaming heads keep sinks + a recent window."""

    threshold: float = param(0.5, "retrieval heads: score (gate) >= threshold (used when retrieval=0)")
    retrieval: float = param(0.0, "fraction of kv-heads kept full, highest scores first (0: use threshold)")
    steps: int = param(100, "heads=auto: calibration steps")
    seed: int = param(42, "heads=auto: calibration seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.retrieval <= 1.0:
            raise ValueError(f"retrieval must be in [0, 1], got {self.retrieval}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @classmethod
    def check_spec(cls, spec: Any) -> None:
        check_head_split(cls, "duo", spec)

    def scores(self, cfg: ModelConfig) -> HeadScores:
        from longctx.heads.duo import DuoSettings  # noqa: PLC0415
        from longctx.heads.resolve import resolve_scores  # noqa: PLC0415

        settings = DuoSettings(steps=self.steps, sinks=self.sinks, window=self.window, seed=self.seed)
        return resolve_scores(self.heads, cfg, "duo", settings)

    def retrieval_rows(self, scores: HeadScores) -> list[list[bool]]:
        from longctx.heads.select import retrieval_mask  # noqa: PLC0415

        return retrieval_mask(scores.scores, self.threshold, self.retrieval)
