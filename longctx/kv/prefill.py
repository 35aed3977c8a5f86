"""Prefill methods: how the prompt is fed to the model.

``dense`` feeds the whole prompt in one forward pass; ``chunked(size=N)``
feeds it N tokens at a time and lets the retain policy evict between chunks,
so peak KV memory is bounded by budget + chunk instead of the prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.registry import param, register


@register("prefill", "dense")
@dataclass(frozen=True)
class Dense:
    """The whole prompt in one forward pass."""

    def chunk_size(self) -> int | None:
        return None


@register("prefill", "chunked")
@dataclass(frozen=True)
class Chunked:
    """The prompt in chunks of `size` tokens, evicting to the budget between chunks."""

    size: int = param(512, "tokens per prefill chunk")

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")

    def chunk_size(self) -> int | None:
        return self.size
