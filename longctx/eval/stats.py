"""Confidence intervals for evaluation scores (numpy only).

* :func:`wilson` — the Wilson score interval for a proportion (0/1 scores).
* :func:`t_interval` — mean ± t quantile × standard error, for continuous scores.
* :func:`bootstrap` — a percentile bootstrap of any statistic (seeded, so reports are reproducible).
* :func:`summarize` — picks Wilson when every value is 0 or 1, else the t interval.

All intervals are two-sided 95 % by default and clipped to ``[lo, hi]`` bounds
when given (scores live in [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided normal quantiles for the confidence levels we support.
_Z = {0.80: 1.2815515655446004, 0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}
# Student t 0.975 quantiles (two-sided 95 %) by degrees of freedom; beyond the table it is interpolated in 1/df.
_T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836, 6: 2.446911851,
         7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852, 11: 2.200985160, 12: 2.178812830,
         13: 2.160368656, 14: 2.144786688, 15: 2.131449546, 16: 2.119905299, 17: 2.109815578, 18: 2.100922040,
         19: 2.093024054, 20: 2.085963447, 21: 2.079613845, 22: 2.073873068, 23: 2.068657610, 24: 2.063898562,
         25: 2.059538553, 26: 2.055529439, 27: 2.051830516, 28: 2.048407142, 29: 2.045229642, 30: 2.042272456,
         40: 2.021075390, 60: 2.000297822, 120: 1.979930405}


def z_quantile(level: float = 0.95) -> float:
    if level not in _Z:
        raise ValueError(f"confidence level must be one of {sorted(_Z)}, got {level}")
    return _Z[level]


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table + interpolation in 1/df)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    lo = max(k for k in keys if k < df)
    hi = next((k for k in keys if k > df), None)
    x_lo, y_lo = 1.0 / lo, _T975[lo]
    x_hi, y_hi = (1.0 / hi, _T975[hi]) if hi else (0.0, _Z[0.95])
    x = 1.0 / df
    return y_hi + (y_lo - y_hi) * (x - x_hi) / (x_lo - x_hi)


def wilson(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` trials; ``(nan, nan)`` when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = z_quantile(level)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends (no rounding to 0.9999...)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


def t_interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """95 % t interval of the mean; a single value gives ``(nan, nan)``, zero spread gives the point."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1:
        return (math.nan, math.nan)
    mean = float(x.mean())
    se = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = t_quantile_975(x.size - 1) * se
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return (lo, hi)


def bootstrap(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_resamples: int = 2000,
              level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (deterministic in ``seed``)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    stats = np.array([stat(x[i]) for i in idx])
    alpha = (1 - level) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))


@dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with a 95 % interval and the method that produced it."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str  # "wilson", "t" or "none"

    def contains(self, value: float) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi)) and self.lo <= value <= self.hi

    def fmt(self, digits: int = 2) -> str:
        if self.n == 0:
            return "-"
        if math.isnan(self.lo):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f},{self.hi:.{digits}f}]"


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0, 1) for v in values)


def summarize(values: Sequence[float], bounds: tuple[float, float] | None = (0.0, 1.0)) -> Summary:
    """Mean and 95 % interval: Wilson when every value is 0/1, else the t interval (clipped to ``bounds``)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0, "none")
    mean = sum(vals) / n
    if is_binary(vals):
        lo, hi = wilson(sum(vals), n)
        return Summary(mean, lo, hi, n, "wilson")
    lo, hi = t_interval(vals, bounds)
    return Summary(mean, lo, hi, n, "t")
