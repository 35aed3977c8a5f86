"""Select methods: which of the kept tokens each decode step reads. ``all`` reads everything."""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.registry import register


@register("select", "all")
@dataclass(frozen=True)
class All:
    """Every decode step reads every kept token."""
