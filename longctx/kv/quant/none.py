"""``quant=none``: kept tokens stay in the model's dtype."""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.registry import register


@register("quant", "none")
@dataclass(frozen=True)
class NoQuant:
    """Keep K/V in the model's dtype."""
