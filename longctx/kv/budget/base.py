"""Budget allocators: how many tokens each layer and kv-head row may keep.

A budget is given as ``tokens`` (absolute) or ``fraction`` (of the prompt
length) and resolved once per request into a base count. The allocator turns
that base into per-layer budgets and, for score-driven allocators, splits a
layer's budget across its kv-heads from the retain policy's scores. The
budget is what the rows really hold: rows longer than it are cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from longctx.kv.registry import param

if TYPE_CHECKING:
    from longctx.model.config import ModelConfig


@dataclass(frozen=True)
class BudgetAllocator:
    """Base allocator. Subclasses override :meth:`layer_budgets` and, if scores matter, :meth:`head_budgets`."""

    tokens: int = param(0, "tokens kept per row (0: use fraction)")
    fraction: float = param(0.0, "fraction of the prompt kept per row (0: use tokens)")
    slack: int = param(0, "while decoding, evict only once a row holds budget + slack tokens, then cut it back to "
                          "the budget (amortises eviction; 0: evict every step)")

    uses_scores: ClassVar[bool] = False
    unlimited: ClassVar[bool] = False
    # head_table gives a fixed budget per (layer, kv-head) from a head-score file (duo, razor, headkv)
    needs_head_scores: ClassVar[bool] = False
    # the budget cuts over-budget rows itself (cut_rows), whatever the retain policy (duo, razor)
    cuts_rows: ClassVar[bool] = False
    # cut rows keep one extra slot holding the mean of the keys / values they dropped (razor)
    compensation_token: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.unlimited:
            return
        if self.slack < 0:
            raise ValueError(f"slack must be >= 0, got {self.slack}")
        if self.tokens < 0 or not 0.0 <= self.fraction <= 1.0:
            raise ValueError("tokens must be >= 0 and fraction in [0, 1]")
        if (self.tokens > 0) == (self.fraction > 0):
            raise ValueError("give exactly one of tokens=N or fraction=F")

    def base(self, prompt_len: int) -> int:
        """Tokens per row for a prompt of ``prompt_len`` tokens."""
        return self.tokens if self.tokens else max(1, round(self.fraction * prompt_len))

    def layer_budgets(self, base: int, num_layers: int) -> list[int]:
        return [base] * num_layers

    def head_budgets(self, layer_budget: int, scores: Tensor, valid: Tensor) -> list[int]:
        """Split one layer's budget over its kv-heads; scores/valid are [num_kv_heads, max_len]."""
        return [layer_budget] * scores.shape[0]

    def head_table(self, base: int, cfg: ModelConfig) -> list[list[int]] | None:
        """A fixed budget per (layer, kv-head) for one request ([num_layers][num_kv_heads]), or None: every head
        keeps its layer's budget. Only called when ``needs_head_scores``."""
        return None

    def cut_rows(self, seq: Any, layer: int, view: Any, window: int | None) -> None:
        """Cut ``layer``'s over-budget rows of ``seq`` (a ``SequenceKV``; ``view`` a fresh gather of the layer).
        Only called when ``cuts_rows``."""
        raise NotImplementedError
