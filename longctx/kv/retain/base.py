"""Base of retain policies: a policy only *scores* tokens; the engine keeps, compacts and frees.

Every retain policy is a frozen dataclass (its parameters are the fields) that
implements :meth:`RetainPolicy.score`. What a policy needs from the engine is
declared as class attributes, never discovered by ``isinstance``:

- ``needs_key_mass``: the engine accumulates, for every stored token, the
  attention it receives from every query (prompt and generated), computed in
  query chunks so a long prompt never materialises its attention matrix;
  ``key_mass_decay`` multiplies the running sum before each update (A2SF).
- ``query_window``: the engine keeps the last N queries of each layer so that
  :meth:`KVView.window_attention` can recompute their attention over the row (and
  :meth:`KVView.window_queries` hands the queries themselves, for policies that hash them).
- ``merges_evicted``: when a row is cut, the engine calls :meth:`RetainPolicy.merge` before
  compacting, so the tokens the cut drops can be folded into the kept ones (D2O); fp rows only.
- ``needs_reconstruction``: scores need a pass of the whole model (KVzip). The engine never evicts inside
  a layer step for it; after a step that would evict it runs the reconstruction pass
  (:func:`longctx.kv.retain.kvzip.compress`), which writes the scores into ``key_mass``, then evicts. A
  shared prefix is compressed once, before its requests fork it.

Selection (done by :func:`longctx.kv.eviction.select_keep`): the first
``sinks`` tokens and the last ``recent_tokens(budget)`` tokens are always
kept, the rest of the budget goes to the highest scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor


@dataclass
class KVView:
    """What a policy sees of one layer's rows of one sequence (padded, copies).

    keys, values: [num_kv_heads, max_len, head_dim] as stored (rotated keys for native positions);
    positions: [num_kv_heads, max_len] original token positions; valid: [num_kv_heads, max_len] bool;
    key_mass: [num_kv_heads, max_len] accumulated attention (only maintained if ``needs_key_mass``);
    window_attention(): [num_kv_heads, group, num_window_queries, max_len] attention probabilities
    of the last queries (only if ``query_window``); layer / num_layers: where the rows sit (-1 when the rows
    of several layers are stacked, which only happens for policies that score rows independently);
    window_queries(): [num_kv_heads, group, num_window_queries, head_dim] those last queries in the frame the
    keys are stored in (rotated at their positions when the rows store rotated keys, raw otherwise).
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    valid: Tensor
    key_mass: Tensor
    window_attention: Callable[[], Tensor]
    layer: int
    num_layers: int
    window_queries: Callable[[], Tensor] | None = None


@dataclass(frozen=True)
class RetainPolicy(ABC):
    """A retain policy: scores tokens; higher score = keep."""

    needs_key_mass: ClassVar[bool] = False
    query_window: ClassVar[int] = 0

    def scores_rows_independently(self) -> bool:
        """Whether a row's scores depend on that row alone (not on other heads of its layer, nor on
        ``KVView.layer``): the engine may then score the rows of several layers stacked in one view."""
        return True
    evicts: ClassVar[bool] = True
    merges_evicted: ClassVar[bool] = False
    needs_reconstruction: ClassVar[bool] = False

    @property
    def sinks(self) -> int:
        return 0

    @property
    def stored_bits_per_token(self) -> int:
        """Bits the method keeps per cached token beside its K and V (an LSH signature): counted in bytes held."""
        return 0

    @property
    def key_mass_decay(self) -> float:
        """Factor applied to the accumulated key mass before each query's contribution (A2SF)."""
        return 1.0

    def window_size(self) -> int:
        """Number of recent queries whose attention ``window_attention`` returns."""
        return self.query_window

    def recent_tokens(self, budget: int) -> int:
        """Most recent tokens always kept when a row is cut to ``budget``."""
        return 0

    @abstractmethod
    def score(self, view: KVView) -> Tensor:
        """[num_kv_heads, max_len] float scores (padding is ignored by the caller)."""

    def merge(self, view: KVView, keep: Tensor, counts: list[int],
              state: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Fold the tokens a cut drops into the kept ones (only called when ``merges_evicted``).

        keep [num_kv_heads, k] / counts: what each row keeps, as :func:`~longctx.kv.eviction.select_keep_padded`
        gives it (row r keeps ``keep[r, :counts[r]]``, sorted; entries past the count are padding). Returns new
        keys and values shaped like ``view.keys`` / ``view.values`` (only kept entries may differ) and this
        layer's state for its next cut (``state`` is what the previous cut returned, None at the first).
        """
        raise NotImplementedError(f"{type(self).__name__} declares no merging")
