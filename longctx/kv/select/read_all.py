"""``all``: every decode step reads every kept token (the default)."""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.registry import register
from longctx.kv.select.base import SelectPolicy


@register("select", "all")
@dataclass(frozen=True)
class All(SelectPolicy):
    """Every decode step reads every kept token."""

    reads_all = True
