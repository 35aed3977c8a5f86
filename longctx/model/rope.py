"""Rotary position embeddings: frequency tables for every RoPE variant, and rotation.

Variants (read from the checkpoint, or forced by a KV spec to run past the
trained context): ``default``, ``linear`` (position interpolation),
``dynamic`` (NTK-aware base growth with the sequence), ``yarn`` (NTK-by-parts
with an attention temperature) and ``llama3`` (Llama-3.1 wavelength bands).

Rotation follows the HF "rotate half" layout: a head vector is split into two
halves that form the real and imaginary parts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longctx.model.config import RopeConfig, yarn_mscale


def inv_freq_and_scale(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """Return (inverse frequencies [head_dim // 2] fp32, cos/sin scale) for ``rope``.

    ``seq_len`` (largest position + 1) only matters for ``dynamic``.
    """
    dim = head_dim
    base = rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    plain = 1.0 / (base**exponents)
    kind = rope.rope_type
    if kind == "default":
        return plain, 1.0
    factor = float(rope.get("factor"))
    if kind == "linear":
        return plain / factor, 1.0
    if kind == "dynamic":
        n = max(seq_len or max_position_embeddings, max_position_embeddings)
        grown = base * ((factor * n / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (grown**exponents), 1.0
    original = int(rope.get("original_max_position_embeddings", max_position_embeddings))
    if kind == "llama3":
        low_ff = float(rope.get("low_freq_factor", 1.0))
        high_ff = float(rope.get("high_freq_factor", 4.0))
        low_wavelen = original / low_ff
        high_wavelen = original / high_ff
        wavelen = 2 * math.pi / plain
        scaled = torch.where(wavelen > low_wavelen, plain / factor, plain)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if kind == "yarn":
        attention_factor = rope.get("attention_factor")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            else:
                attention_factor = yarn_mscale(factor)
        beta_fast = rope.get("beta_fast") or 32
        beta_slow = rope.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv = (plain / factor) * (1 - extrapolate) + plain * extrapolate
        return inv, float(attention_factor)
    raise ValueError(f"unknown rope type {kind!r}")


def cos_sin(inv_freq: Tensor, scale: float, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [*positions.shape, head_dim] for integer ``positions``, computed in fp32."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to ``x`` [..., head_dim] with broadcastable ``cos``/``sin`` [..., head_dim]."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


class Rotary:
    """RoPE of one layer type, with its inverse frequencies cached per (device, seq_len class)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self._cache: dict[tuple[str, int], tuple[Tensor, float]] = {}

    def tables(self, positions: Tensor, dtype: torch.dtype, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """cos/sin [*positions.shape, head_dim] for ``positions``; ``seq_len`` drives dynamic NTK."""
        key_len = (seq_len or 0) if self.rope.rope_type == "dynamic" else 0
        if key_len <= self.max_position_embeddings:
            key_len = 0
        key = (str(positions.device), key_len)
        if key not in self._cache:
            inv, scale = inv_freq_and_scale(self.rope, self.head_dim, self.max_position_embeddings, key_len or None)
            self._cache[key] = (inv.to(positions.device), scale)
        inv, scale = self._cache[key]
        return cos_sin(inv, scale, positions, dtype)
