"""Forced RoPE scaling to run past the trained context: ``linear``, ``ntk`` (dynamic NTK) and ``yarn``.

These replace the checkpoint's RoPE for every layer of the request with the
given scaling ``factor``; keys stay stored rotated (native positions).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.kv.positions.base import PositionPolicy
from longctx.kv.registry import param, register
from longctx.model.config import RopeConfig


@dataclass(frozen=True)
class _ForcedScaling(PositionPolicy):
    factor: float = param(2.0, "context extension factor")
    rope_type = "default"

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"factor must be >= 1, got {self.factor}")

    def rope_override(self, rope: RopeConfig, max_position_embeddings: int) -> RopeConfig | None:
        params = {"factor": self.factor, "original_max_position_embeddings": max_position_embeddings}
        return RopeConfig(theta=rope.theta, rope_type=self.rope_type, params=tuple(sorted(params.items())))


@register("positions", "linear")
@dataclass(frozen=True)
class LinearScaling(_ForcedScaling):
    """Position interpolation: positions divided by `factor`."""

    rope_type = "linear"


@register("positions", "ntk")
@dataclass(frozen=True)
class NTKScaling(_ForcedScaling):
    """Dynamic NTK-aware scaling: the RoPE base grows once the sequence passes the trained context."""

    rope_type = "dynamic"


@register("positions", "yarn")
@dataclass(frozen=True)
class YarnScaling(_ForcedScaling):
    """YaRN: NTK-by-parts interpolation with an attention temperature."""

    rope_type = "yarn"
