"""Human-readable quantities for messages and tables (plots label their axes with ``eval.plots.human_bytes``)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``23592960`` -> ``"22.5 MiB"`` (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
