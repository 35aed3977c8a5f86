"""``d2o``: heavy hitters + recent tokens, evicted tokens merged into similar kept ones (Wan et al., arXiv:2406.13035).

Token level, as in D2O's code: a row keeps its first ``num_sinks`` tokens, its most recent ``recent`` share of
the budget and the rest by accumulated attention (H2O's key mass, prompt and generated queries). Each token the
cut drops is then re-discriminated: its nearest kept token by key cosine similarity ``u`` is found, and it is
merged into that token when ``u`` reaches the layer's threshold ``tau``, an exponential moving average of the
mean nearest-neighbour similarity of every cut of the layer so far (``tau_0`` = the first cut's mean; then
``tau = (1 - ema) * tau + ema * mean``; the code's defaults alpha = beta = 0.5). Merging is the paper's weighted
average (its Eq. 11-12): a kept token ``c`` that absorbs evicted tokens ``e_i`` becomes

    k_c <- (e * k_c + sum_i exp(u_i) * k_i) / (e + sum_i exp(u_i))        (same weights for v_c)

(``e = exp(cos(k_c, k_c))``), so ``(e + sum exp(u_i)) * v_c'`` is exactly the weighted sum of the merged values.
Evicted tokens below the threshold are dropped. A merged token keeps its position and its key mass, and holds
the bytes of one token like any other.

Not reproduced here:

- D2O's layer level (per-layer budgets from the variance of each layer's prompt attention, a softmax across
  layers): it needs every layer's prompt attention before the first layer is cut, while the engine cuts each
  layer inside its own step (D2O's code compresses the prompt at the first decode step instead). The budget
  axis gives static per-layer budgets (``budget=pyramid``) meanwhile.
- The code compresses neither layers 0 and 1 nor the last; here every layer evicts.
- The code's merge is ``scatter_reduce(mean)`` of ``u_i * k_i`` into the kept token (a different weighting);
  its threshold test averages similarities over heads; here each kv-row merges on its own similarities, with one
  threshold per layer, and GQA rows score by the key mass summed over their query heads.
- Quantized rows cannot store merged values: the spec refuses ``quant`` with this policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy

_CHUNK = 4096  # evicted candidates compared to the kept tokens per matrix product (bounds memory on long rows)


def nearest_kept(keys: Tensor, keep: Tensor, kept_valid: Tensor) -> tuple[Tensor, Tensor]:
    """For every entry of every row, the cosine similarity to its most similar kept key and that key's slot
    in ``keep``: keys [H, L, D], keep [H, k] indices into L, kept_valid [H, k] -> (sim [H, L], slot [H, L]).
    Rows with no valid kept key get similarity -inf."""
    num_rows, length, _ = keys.shape
    unit = F.normalize(keys.float(), dim=-1)
    kept = unit.gather(1, keep.clamp_max(length - 1)[..., None].expand(-1, -1, unit.shape[-1]))  # [H, k, D]
    sims, slots = [], []
    for s in range(0, length, _CHUNK):
        u = torch.matmul(unit[:, s : s + _CHUNK], kept.transpose(1, 2))  # [H, c, k]
        u = u.masked_fill(~kept_valid[:, None, :], float("-inf"))
        best, slot = u.max(dim=-1)
        sims.append(best)
        slots.append(slot)
    return torch.cat(sims, dim=1), torch.cat(slots, dim=1)


def weighted_merge(x: Tensor, keep: Tensor, counts_valid: Tensor, slot: Tensor, weight: Tensor) -> Tensor:
    """Merge entries into kept ones: kept entry j of row h becomes ``(e * x_j + sum_i w_i x_i) / (e + sum_i w_i)``
    over the entries i with ``slot[h, i] == j`` and weight ``w_i = weight[h, i]`` (0: not merged).

    x [H, L, D]; keep [H, k] (indices into L, padding past the row's count); counts_valid [H, k] bool (real
    kept entries); slot [H, L] in [0, k); weight [H, L] >= 0. Returns x with its kept entries replaced."""
    num_rows, length, dim = x.shape
    xf = x.float()
    idx = slot[..., None].expand(-1, -1, dim)
    num = torch.zeros(num_rows, keep.shape[1], dim, dtype=torch.float32, device=x.device)
    num.scatter_add_(1, idx, weight[..., None] * xf)
    den = torch.zeros(num_rows, keep.shape[1], dtype=torch.float32, device=x.device)
    den.scatter_add_(1, slot, weight)
    safe = keep.clamp_max(length - 1)
    kept_x = xf.gather(1, safe[..., None].expand(-1, -1, dim))
    merged = (math.e * kept_x + num) / (math.e + den)[..., None]
    # write back through a spare column: padding entries (past a row's count) land there and are dropped
    target = torch.where(counts_valid, safe, torch.full_like(safe, length))
    out = torch.cat([xf, xf.new_zeros(num_rows, 1, dim)], dim=1)
    out.scatter_(1, target[..., None].expand(-1, -1, dim), merged)
    return out[:, :length].to(x.dtype)


@register("retain", "d2o")
@dataclass(frozen=True)
class D2O(RetainPolicy):
    """H2O-style cut whose dropped tokens merge into their most similar kept token when similar enough."""

    needs_key_mass: ClassVar[bool] = True
    merges_evicted: ClassVar[bool] = True
    num_sinks: int = param(4, "initial tokens always kept (D2O's code keeps 4)")
    recent: float = param(0.5, "fraction of the budget reserved for the most recent tokens")
    ema: float = param(0.5, "weight of each cut's mean nearest-kept similarity in the layer's merge threshold")

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")
        if not 0.0 < self.ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {self.ema}")

    @property
    def sinks(self) -> int:
        return self.num_sinks

    def recent_tokens(self, budget: int) -> int:
        return int(budget * self.recent)

    def score(self, view: KVView) -> Tensor:
        return view.key_mass

    def merge(self, view: KVView, keep: Tensor, counts: list[int],
              state: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        keys, values, valid = view.keys, view.values, view.valid
        num_rows, length, _ = keys.shape
        dev = keys.device
        k = keep.shape[1]
        counts_t = torch.tensor(counts, dtype=torch.int64, device=dev)
        kept_valid = torch.arange(k, device=dev)[None, :] < counts_t[:, None]  # [H, k]
        kept = torch.zeros(num_rows, length + 1, dtype=torch.bool, device=dev)
        kept.scatter_(1, torch.where(kept_valid, keep.clamp_max(length), length), True)
        evicted = valid & ~kept[:, :length] & (counts_t > 0)[:, None]  # rows keeping nothing merge nothing
        sim, slot = nearest_kept(keys, keep, kept_valid)
        # the layer's threshold: EMA of the mean nearest-kept similarity of the evicted tokens (nan: not set yet)
        n = evicted.sum()
        mean = sim.masked_fill(~evicted, 0.0).sum() / n.clamp_min(1)
        prev = torch.tensor(float("nan"), device=dev) if state is None else state
        updated = torch.where(torch.isnan(prev), mean, (1.0 - self.ema) * prev + self.ema * mean)
        tau = torch.where(n > 0, updated, prev)
        merge = evicted & (sim >= tau)
        weight = torch.where(merge, sim.clamp_min(-1.0).exp(), torch.zeros_like(sim))  # exp(u_i), 0: dropped
        return (weighted_merge(keys, keep, kept_valid, slot, weight),
                weighted_merge(values, keep, kept_valid, slot, weight), tau)
