"""``native``: kept tokens keep their original RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.positions.base import PositionPolicy
from longctx.kv.registry import register


@register("positions", "native")
@dataclass(frozen=True)
class Native(PositionPolicy):
    """Kept tokens keep their original positions (no change)."""
