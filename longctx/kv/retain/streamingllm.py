"""``streamingllm``: attention sinks plus a recent window (Xiao et al., arXiv:2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@register("retain", "streamingllm")
@dataclass(frozen=True)
class StreamingLLM(RetainPolicy):
    """Keep the first `sinks` tokens and the most recent ones up to the budget."""

    num_sinks: int = param(4, "initial 'attention sink' tokens always kept")

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")

    @property
    def sinks(self) -> int:
        return self.num_sinks

    def score(self, view: KVView) -> Tensor:
        return view.positions.float()  # newest first after the sinks
