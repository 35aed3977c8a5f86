"""From head scores to what each cache row may hold.

- :func:`retrieval_mask`: which (layer, kv-head) rows are retrieval heads, by ``threshold`` (score >= it) or by
  ``fraction`` (the top fraction of all kv-heads; ties broken toward earlier layers / heads, deterministically);
- :func:`proportional_split`: integer budgets in proportion to scores, summing exactly to a total (largest
  remainders), each at least a floor.
"""

from __future__ import annotations

import math

FULL_ROW = 1 << 62  # the budget of a row that keeps everything (never reached, so never cut)


def retrieval_mask(scores: list[list[float]], threshold: float, fraction: float) -> list[list[bool]]:
    """``fraction`` > 0: the ``round(fraction * rows)`` highest-scoring rows; else rows scoring >= ``threshold``."""
    if fraction > 0:
        flat = [(-s, layer, h) for layer, row in enumerate(scores) for h, s in enumerate(row)]
        k = round(fraction * len(flat))
        chosen = {(layer, h) for _, layer, h in sorted(flat)[:k]}
        return [[(layer, h) in chosen for h in range(len(row))] for layer, row in enumerate(scores)]
    return [[s >= threshold for s in row] for row in scores]


def proportional_split(total: int, weights: list[float], floor: int) -> list[int]:
    """Split ``total`` into ``len(weights)`` integers: ``floor`` each, the rest in proportion to the (clipped at 0)
    weights (equally when they are all 0); the parts sum to ``total`` (when ``total >= floor * len``)."""
    n = len(weights)
    floor = max(0, min(floor, total // max(n, 1)))
    rest = total - floor * n
    w = [max(0.0, x) if math.isfinite(x) else 0.0 for x in weights]
    mass = sum(w)
    shares = [rest * x / mass for x in w] if mass > 0 else [rest / n] * n
    parts = [math.floor(s) for s in shares]
    order = sorted(range(n), key=lambda i: (-(shares[i] - parts[i]), i))
    for i in order[: rest - sum(parts)]:
        parts[i] += 1
    return [floor + p for p in parts]
