"""``quant=int8`` / ``quant=int4``: KIVI-style KV quantization (Liu et al., arXiv:2402.02750).

Keys are quantized **per channel**: every channel of a group of ``group``
consecutive tokens shares one scale and zero point (keys have outlier
channels, so a channel's range is the tight one). Values are quantized **per
token**: every ``group`` consecutive channels of one token share a scale and
zero point. Both are asymmetric min/max codes: ``x ≈ code * scale + zero``,
``code = round((x - zero) / scale)`` in ``[0, 2**bits - 1]``, with scale and
zero stored in fp16. Int4 codes are packed two per byte. The most recent
``residual`` tokens of every row stay in full precision (KIVI's residual).

Storage (``kv.rows``): a row is a prefix of quantized blocks (in a separate
:class:`~longctx.kv.pool.QuantBlockPool`) followed by a suffix of ordinary fp
blocks. A quantized block holds ``lcm(block_size, group)`` tokens, so it is
made of whole fp blocks and holds whole key groups; its bytes are codes +
scales + zeros. This module holds the math (plain torch, the reference) and
the two method classes, which describe the block layout and encode / decode
blocks; the rows do the bookkeeping.

Bytes per stored element (fp16 scale + zero): ``bits + 32 / group`` for keys
and ``bits + 32 / value_group`` for values, e.g. int4 with group 32 on a head
of 128 channels is 5 bits, 0.31 of fp16; on a head of 16 channels the value
group is capped at 16, giving 0.34 of fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longctx.kv.registry import param, register

SCALE_DTYPE = torch.float16
_FP16_MAX = 65504.0


# ---- the math -------------------------------------------------------------------------------------
def _scale_zero(mn: Tensor, mx: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """fp16 (scale, zero) with [zero, zero + qmax * scale] covering [mn, mx] (fp32 in, same shape out).

    The fp16 rounding is directed (zero down, scale up) so that every input lies inside the
    representable range and the error of a code is at most scale / 2. Inputs beyond the fp16
    range saturate at +-65504.
    """
    qmax = 2**bits - 1
    mn = mn.clamp(-_FP16_MAX, _FP16_MAX)
    mx = mx.clamp(-_FP16_MAX, _FP16_MAX)
    zero = mn.to(SCALE_DTYPE)
    zero = torch.where(zero.float() > mn, torch.nextafter(zero, torch.full_like(zero, -math.inf)), zero)
    scale32 = (mx - zero.float()) / qmax
    scale = scale32.to(SCALE_DTYPE)
    scale = torch.where(scale.float() < scale32, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    return scale, zero


def _codes(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """uint8 codes of fp32 ``x`` under broadcastable fp16 ``scale`` / ``zero``."""
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x - zero.float()) / safe)
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def quantize_keys(k: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel quantization over groups of ``group`` tokens.

    k [..., T, D] (T a multiple of ``group``) -> codes uint8 [..., T, D] (unpacked, in [0, 2**bits - 1]),
    scale fp16 [..., T // group, D], zero fp16 [..., T // group, D].
    """
    t = k.shape[-2]
    if t % group:
        raise ValueError(f"key tokens ({t}) must be a multiple of the group ({group})")
    x = k.float().unflatten(-2, (t // group, group))  # [..., G, group, D]
    scale, zero = _scale_zero(x.amin(dim=-2), x.amax(dim=-2), bits)  # [..., G, D]
    codes = _codes(x, scale.unsqueeze(-2), zero.unsqueeze(-2), bits)  # [..., G, group, D]
    return codes.flatten(-3, -2), scale, zero


def dequantize_keys(codes: Tensor, scale: Tensor, zero: Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """codes [..., T, D], scale / zero [..., T // group, D] -> keys [..., T, D] in ``dtype``."""
    t = codes.shape[-2]
    x = codes.float().unflatten(-2, (t // group, group))  # [..., G, group, D]
    out = x * scale.float().unsqueeze(-2) + zero.float().unsqueeze(-2)
    return out.flatten(-3, -2).to(dtype)


def quantize_values(v: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token quantization over groups of ``group`` channels.

    v [..., T, D] (D a multiple of ``group``) -> codes uint8 [..., T, D] (unpacked),
    scale fp16 [..., T, D // group], zero fp16 [..., T, D // group].
    """
    d = v.shape[-1]
    if d % group:
        raise ValueError(f"value channels ({d}) must be a multiple of the group ({group})")
    x = v.float().unflatten(-1, (d // group, group))  # [..., T, G, group]
    scale, zero = _scale_zero(x.amin(dim=-1), x.amax(dim=-1), bits)  # [..., T, G]
    codes = _codes(x, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)  # [..., T, G, group]
    return codes.flatten(-2), scale, zero


def dequantize_values(codes: Tensor, scale: Tensor, zero: Tensor, group: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """codes [..., T, D], scale / zero [..., T, D // group] -> values [..., T, D] in ``dtype``."""
    d = codes.shape[-1]
    x = codes.float().unflatten(-1, (d // group, group))  # [..., T, G, group]
    out = x * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] [..., D] (D even) -> packed uint8 [..., D // 2]: even channel low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """packed uint8 [..., D // 2] -> codes uint8 [..., D] in [0, 15] (inverse of :func:`pack_int4`)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


# ---- the methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KIVIQuant:
    """KIVI-style quantized KV storage (base of ``int8`` / ``int4``)."""

    group: int = param(32, "group size: tokens sharing a key scale per channel, and channels sharing a value "
                           "scale per token (capped to a divisor of head_dim for values)")
    residual: int = param(64, "most recent tokens of each row kept in full precision")
    bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual}")

    # layout --------------------------------------------------------------------------------------
    def tokens_per_block(self, block_size: int) -> int:
        """Tokens in one quantized block: whole fp blocks and whole key groups."""
        return math.lcm(block_size, self.group)

    def value_group(self, head_dim: int) -> int:
        """Channels sharing a value scale: ``group``, capped to a divisor of ``head_dim``."""
        return math.gcd(head_dim, self.group)

    def _code_width(self, head_dim: int) -> int:
        if self.bits == 4 and head_dim % 2:
            raise ValueError(f"int4 needs an even head_dim, got {head_dim}")
        return head_dim * self.bits // 8

    def fields(self, head_dim: int, tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-block tensors (shape without the block dim, dtype) of a block of ``tokens`` tokens."""
        w = self._code_width(head_dim)
        vg = head_dim // self.value_group(head_dim)
        return {
            "k_codes": ((tokens, w), torch.uint8),
            "k_scale": ((tokens // self.group, head_dim), SCALE_DTYPE),
            "k_zero": ((tokens // self.group, head_dim), SCALE_DTYPE),
            "v_codes": ((tokens, w), torch.uint8),
            "v_scale": ((tokens, vg), SCALE_DTYPE),
            "v_zero": ((tokens, vg), SCALE_DTYPE),
        }

    # blocks --------------------------------------------------------------------------------------
    def _pack(self, codes: Tensor) -> Tensor:
        return pack_int4(codes) if self.bits == 4 else codes

    def _unpack(self, codes: Tensor) -> Tensor:
        return unpack_int4(codes) if self.bits == 4 else codes

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """k, v [n, tokens, D] -> the fields of n quantized blocks ([n, *shape] each)."""
        kc, ks, kz = quantize_keys(k, self.bits, self.group)
        vc, vs, vz = quantize_values(v, self.bits, self.value_group(v.shape[-1]))
        return {"k_codes": self._pack(kc), "k_scale": ks, "k_zero": kz,
                "v_codes": self._pack(vc), "v_scale": vs, "v_zero": vz}

    def decode(self, data: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Fields of n blocks -> (k, v) [n, tokens, D] in ``dtype``."""
        k = dequantize_keys(self._unpack(data["k_codes"]), data["k_scale"], data["k_zero"], self.group, dtype)
        d = k.shape[-1]
        v = dequantize_values(self._unpack(data["v_codes"]), data["v_scale"], data["v_zero"],
                              self.value_group(d), dtype)
        return k, v


@register("quant", "int8")
@dataclass(frozen=True)
class Int8KV(KIVIQuant):
    """8-bit KIVI KV cache: keys per channel, values per token; recent `residual` tokens in full precision."""

    bits: ClassVar[int] = 8


@register("quant", "int4")
@dataclass(frozen=True)
class Int4KV(KIVIQuant):
    """4-bit KIVI KV cache (two codes per byte): keys per channel, values per token; recent tokens in fp."""

    bits: ClassVar[int] = 4
