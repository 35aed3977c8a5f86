"""Sampling parameters of a request (vLLM's names and meanings), validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. ``top_k`` 0 or -1 (vLLM's spelling), ``top_p`` 1.0 and ``min_p`` 0
    disable those filters. ``repetition_penalty`` (1 = off) divides positive / multiplies negative
    logits of every token seen in the prompt or the output; ``presence_penalty`` and
    ``frequency_penalty`` (0 = off) subtract a constant, or the count, for tokens already generated
    (as in vLLM and OpenAI). ``seed`` makes sampling reproducible per request; with ``n`` > 1 the
    i-th completion uses ``seed + i``. Generation stops at ``max_tokens``, at the model's
    end-of-sequence ids (unless ``ignore_eos``), at any of ``stop_token_ids`` or when the text
    contains one of ``stop`` (left out of the text unless ``include_stop_str_in_output``); none of
    these stop a request before ``min_tokens`` tokens. ``logprobs`` = k returns, for every generated
    token, its log-probability and the k most likely alternatives; ``prompt_logprobs`` = k does the same
    for every prompt token (None for the first, which has no context).
    """

    n: int = 1
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _int(self.n, "n", 1)
        _int(self.max_tokens, "max_tokens", 1)
        _int(self.min_tokens, "min_tokens", 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _float(self.temperature, "temperature", 0.0)
        _int(self.top_k, "top_k", -1)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _float(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _float(self.min_p, "min_p", 0.0)
        if self.min_p > 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _float(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _float(value, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.logprobs is not None:
            _int(self.logprobs, "logprobs", 0)
        if self.prompt_logprobs is not None:
            _int(self.prompt_logprobs, "prompt_logprobs", 0)
        if self.seed is not None:
            _int(self.seed, "seed", 0)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for t in self.stop_token_ids:
            _int(t, "stop_token_ids entry", 0)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _float(value: object, name: str, low: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
