"""``hashevict``: evict the keys most cosine-dissimilar to the current query, by LSH (Liu et al., arXiv:2412.16187).

Keys and the latest query are hashed by the signs of a seeded Gaussian projection ``[head_dim, bits]``
(SimHash): two signatures differ in a bit with probability ``angle / pi``, so the Hamming distance between a
key's signature and the query's estimates their angle. The keys farthest from the query (largest distance)
are the most cosine-dissimilar, expected to get the least attention, and go first; no attention is computed
to score. A token's score is minus its distance: the engine keeps the highest scores.

What differs from the paper's mechanics (scores are the paper's; bookkeeping is the engine's):

- Signatures are computed from the stored keys each time the policy scores, not kept per row (the same bits:
  the projection is fixed and the stored keys are the keys that were hashed). The paper keeps a binary
  signature per cached token (``bits / 8`` bytes a token, beside the K/V); bytes held count them as if stored
  (``stored_bits_per_token``: ``bits * block_size / 8`` bytes per block, rounded up), while the pool holds none
  and scoring costs one ``[length, head_dim] x [head_dim, bits]`` product per row.
- The engine cuts a row after the step's attention (the new token is attended, then the row is cut to its
  budget); the paper evicts before attention to also save that step's compute. What is dropped is the same.
- Grouped-query attention: a kv-row's distance is the mean over the query heads of its group.
- Queries and keys are hashed in the frame the rows store keys in: rotated at their positions (native RoPE),
  raw for positions policies that store raw keys (rerotate, self_extend, lm_infinite).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy


@lru_cache(maxsize=32)
def _projection_cpu(head_dim: int, bits: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, bits, generator=g, dtype=torch.float32)


def projection(head_dim: int, bits: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The Gaussian projection [head_dim, bits] for ``seed`` (the same on every device and every call)."""
    return _projection_cpu(head_dim, bits, seed).to(device)


def signatures(x: Tensor, proj: Tensor) -> Tensor:
    """Binary signatures [..., bits] (bool) of vectors x [..., head_dim]: the signs of their projections."""
    return torch.matmul(x.float(), proj) >= 0


def hamming(query_sig: Tensor, key_sig: Tensor) -> Tensor:
    """Hamming distances [..., Q, L] between query signatures [..., Q, bits] and key signatures [..., L, bits]."""
    q = query_sig.float() * 2 - 1  # +-1: agreeing bits add 1, differing bits subtract 1
    k = key_sig.float() * 2 - 1
    bits = q.shape[-1]
    return (bits - torch.matmul(q, k.transpose(-1, -2))) / 2


@register("retain", "hashevict")
@dataclass(frozen=True)
class HashEvict(RetainPolicy):
    """Evict the keys whose LSH signature is farthest (Hamming) from the current query's: the most dissimilar."""

    query_window: ClassVar[int] = 1
    bits: int = param(16, "signature length: Gaussian projections whose signs hash each query and key")
    seed: int = param(0, "seed of the projection matrix (the same seed gives the same signatures)")
    sinks: int = param(4, "initial tokens always kept")  # type: ignore[assignment]  # overrides the base property
    recent: int = param(1, "most recent tokens always kept (1: the current token always enters the cache)")

    def __post_init__(self) -> None:
        if self.bits < 1:
            raise ValueError(f"bits must be >= 1, got {self.bits}")
        if self.sinks < 0 or self.recent < 0:
            raise ValueError("sinks and recent must be >= 0")

    def recent_tokens(self, budget: int) -> int:
        return self.recent

    @property
    def stored_bits_per_token(self) -> int:
        return self.bits  # the signature of every cached key (the paper stores it; see the module docstring)

    def score(self, view: KVView) -> Tensor:
        assert view.window_queries is not None, "hashevict needs the engine to hand it the current query"
        query = view.window_queries()[:, :, -1:]  # [H, G, 1, D]: the latest query of each head of the group
        proj = projection(view.keys.shape[-1], self.bits, self.seed, view.keys.device)
        key_sig = signatures(view.keys, proj)[:, None]  # [H, 1, L, bits]
        dist = hamming(signatures(query, proj), key_sig)[:, :, 0]  # [H, G, L]
        return -dist.mean(dim=1)
