"""Plain-torch attention contexts for running the one decoder over one whole sequence (no KV cache).

They implement the decoder's ``AttentionContext`` protocol with the reference attention
(``longctx.attention.reference.attention_probs``), so everything is differentiable and obviously correct:

- :class:`ProbeContext` computes full causal attention and hands each layer's probabilities of chosen query
  rows to a callback (retrieval scores, sink statistics, attention maps);
- :class:`GatedContext` is DuoAttention's training-time attention: per (layer, kv-head) a gate ``a`` mixes
  full attention and sinks + window ("streaming") attention, ``a * full + (1 - a) * streaming``.

Sliding-window layers keep their window in both (the streaming mask is the intersection).

:class:`GatedContext` and :class:`FullContext` need only the attention output, so unless the model soft-caps
its logits (or ``LONGCTX_ATTENTION=reference``) they run it through SDPA (``attention/sdpa.py``) and mix the
two outputs, ``a * O_full + (1 - a) * O_streaming``, which equals mixing the probabilities (the product with V
is linear) without the two [Hkv, G, T, T] probability matrices and their backward: a calibration step on
SmolLM2 at ~1.1K tokens went from 45.6 s to 8.7 s on the 2-core CPU in fp32 (with the masks built once per
sequence rather than per layer). Tests compare both ways.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from longctx.attention.reference import attention_probs, causal_mask
from longctx.attention.sdpa import reference_forced, sdpa_whole
from longctx.model.config import ModelConfig
from longctx.model.rope import Rotary, rotate


class _WholeSequence:
    def __init__(self, cfg: ModelConfig, num_tokens: int, device: torch.device) -> None:
        self.cfg = cfg
        self.pos = torch.arange(num_tokens, device=device)
        self.valid = torch.ones(cfg.num_kv_heads, num_tokens, dtype=torch.bool, device=device)
        self._masks: dict[tuple[str, int | None], Tensor] = {}  # by (kind, sliding window): layers share them

    def _heads(self, q: Tensor, k: Tensor, rotary: Rotary) -> tuple[Tensor, Tensor]:
        """Rotated q [Hkv, G, T, D] and k [Hkv, T, D]."""
        cfg, n = self.cfg, q.shape[0]
        cos, sin = rotary.tables(self.pos, q.dtype, n)
        q = rotate(q, cos[:, None], sin[:, None])
        k = rotate(k, cos[:, None], sin[:, None])
        group = cfg.num_heads // cfg.num_kv_heads
        return q.view(n, cfg.num_kv_heads, group, cfg.head_dim).permute(1, 2, 0, 3), k.permute(1, 0, 2)

    def mask(self, layer: int) -> Tensor:
        """bool [Hkv, T, T] causal mask of ``layer`` (with its sliding window), built once per window."""
        window = self.cfg.window_of(layer)
        return self._cached(("full", window), lambda: causal_mask(
            self.pos, self.pos[None].expand(self.cfg.num_kv_heads, -1), self.valid, window))

    def _cached(self, key: tuple[str, int | None], build: Callable[[], Tensor]) -> Tensor:
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def probs(self, layer: int, qh: Tensor, kh: Tensor, mask: Tensor) -> Tensor:
        logits = torch.matmul(qh, kh[:, None].transpose(-1, -2))  # [Hkv, G, T, T]
        return attention_probs(logits, mask, self.cfg.scale, self.cfg.attn_logit_softcapping)

    def _out(self, p: Tensor, v: Tensor) -> Tensor:
        return self._merge(torch.matmul(p.to(v.dtype), v.permute(1, 0, 2)[:, None]))

    def _merge(self, out: Tensor) -> Tensor:
        """[Hkv, G, T, D] -> [T, H, D]."""
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], self.cfg.num_heads, self.cfg.head_dim)

    def fused(self) -> bool:
        """Whether only outputs are formed (SDPA): not with soft-capped logits, nor when the reference is forced."""
        return not self.cfg.attn_logit_softcapping and not reference_forced()

    def bias(self, kind: str, layer: int, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """``mask`` (bool [Hkv, T, T], the same for every head; ``kind`` names it) as SDPA's additive [T, T]
        mask in ``dtype`` (the queries'), built once per kind, window and dtype."""
        return self._cached((f"{kind} bias {dtype}", self.cfg.window_of(layer)), lambda: torch.zeros(
            mask.shape[1:], device=mask.device, dtype=dtype).masked_fill(~mask[0], float("-inf")))

    def sdpa(self, qh: Tensor, kh: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Attention output [Hkv, G, T, D] of rotated ``qh`` / ``kh`` over ``v`` [T, Hkv, D]; ``bias`` (from
        :meth:`bias`, in qh's dtype) None = causal."""
        return sdpa_whole(qh, kh, v.permute(1, 0, 2).to(qh.dtype), bias, self.cfg.scale).to(v.dtype)


# callback(layer, query_rows [n], probs [Hkv, G, n, T])
ProbeFn = Callable[[int, Tensor, Tensor], None]


class ProbeContext(_WholeSequence):
    """Full causal attention; ``probe(layer, rows, probs)`` sees the probabilities of the query ``rows``."""

    def __init__(self, cfg: ModelConfig, num_tokens: int, device: torch.device, rows: Tensor,
                 probe: ProbeFn) -> None:
        super().__init__(cfg, num_tokens, device)
        self.rows = rows.to(device)
        self.probe = probe

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        qh, kh = self._heads(q, k, rotary)
        p = self.probs(layer, qh, kh, self.mask(layer))
        self.probe(layer, self.rows, p[:, :, self.rows].float())
        return self._out(p, v)


def streaming_mask(full: Tensor, pos: Tensor, sinks: int, window: int) -> Tensor:
    """``full`` [H, T, T] restricted to the first ``sinks`` keys and the last ``window`` keys of each query."""
    diff = pos[:, None] - pos[None, :]
    keep = (pos[None, :] < sinks) | (diff < window)
    return full & keep[None]


class GatedContext(_WholeSequence):
    """DuoAttention's mixed attention: ``gates`` [L, Hkv] in [0, 1] weigh full against sinks + window."""

    def __init__(self, cfg: ModelConfig, num_tokens: int, device: torch.device, gates: Tensor, sinks: int,
                 window: int) -> None:
        super().__init__(cfg, num_tokens, device)
        self.gates = gates
        self.sinks = sinks
        self.window = window

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        qh, kh = self._heads(q, k, rotary)
        full_mask = self.mask(layer)
        window = self.cfg.window_of(layer)
        stream_mask = self._cached(("stream", window), lambda: streaming_mask(full_mask, self.pos, self.sinks,
                                                                             self.window))
        if self.fused():
            full = self.sdpa(qh, kh, v, None if window is None else self.bias("full", layer, full_mask, qh.dtype))
            stream = self.sdpa(qh, kh, v, self.bias("stream", layer, stream_mask, qh.dtype))
            g = self.gates[layer].to(full.dtype)[:, None, None, None]
            return self._merge(g * full + (1 - g) * stream)
        full = self.probs(layer, qh, kh, full_mask)
        stream = self.probs(layer, qh, kh, stream_mask)
        g = self.gates[layer].to(full.dtype)[:, None, None, None]
        return self._out(g * full + (1 - g) * stream, v)


class FullContext(_WholeSequence):
    """Plain full causal attention (the teacher of the calibration)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        qh, kh = self._heads(q, k, rotary)
        if self.fused():
            windowed = self.cfg.window_of(layer) is not None
            bias = self.bias("full", layer, self.mask(layer), qh.dtype) if windowed else None
            return self._merge(self.sdpa(qh, kh, v, bias))
        return self._out(self.probs(layer, qh, kh, self.mask(layer)), v)
