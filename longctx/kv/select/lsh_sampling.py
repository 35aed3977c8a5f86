"""``lsh_sampling``: SimHash LSH sampling with importance weights (MagicPIG, Chen et al., arXiv:2410.16179).

Each decode step reads a *sample* of each row, drawn by locality-sensitive hashing, and estimates attention
with self-normalised importance sampling instead of taking the top keys:

- SimHash: ``tables`` (L) tables of ``bits`` (K) random hyperplanes each, one Gaussian [D, L * K] matrix per
  layer drawn from ``seed`` (the same for every kv-head and every sequence, so runs are reproducible). A key's
  code in a table is its K sign bits packed into one integer (uint8 / int16 / int32, the smallest that holds K
  bits). Keys are centred first (``center``): MagicPIG subtracts the mean of the keys it hashes, since raw
  keys share a large common direction; softmax is unchanged by the shift (q·μ is the same for every key).
- Codes are computed once and kept in ``state.per_seq`` (per layer): the whole row when the state is empty
  (first decode step, or after the engine dropped it on compaction), then only the newest token's codes each
  step. Kept codes are used only if the sequence's ``state.steps`` advanced by exactly one since they were
  written (else that sequence is rehashed: a skipped step would leave a token without codes). The kept
  tensors are one batch tensor shared by the group's sequences (each sequence's dict holds the
  batch tensor and its row in it), so a step with the same group does no per-sequence work; another group is
  re-stacked once (one copy per source batch). Without per-sequence state (``state.per_seq`` empty, e.g. a
  one-off call) the codes are rebuilt on every call.
- A step hashes each query head and counts, for every token of the row, the tables in which its code equals
  the query's (vectorised: codes [B, H, N, L] against query codes [B, H, G, L], in chunks of tokens). A token
  is sampled for query head g when it collides in at least ``min_collisions`` tables (MagicPIG: 2).
- Its sampling probability is ``u = P[Binomial(L, p^K) >= m]`` with ``p = 1 - θ/π``, θ the angle between the
  query and the (centred) key, computed exactly for the selected tokens only (float64; the small-tail case
  summed term by term so that tiny u keep their relative precision). The logit gets ``-log(u + eps)``
  (``eps`` = 1e-4 as in MagicPIG's reference code; 0 gives the plain estimator ``-log u``).
- The first ``sinks`` and the last ``window`` tokens are always read exactly (log-weight 0) and are never
  counted as samples (no double counting); together with the samples this is MagicPIG's merge of its exact GPU
  part (sink + local tokens) with its sampled CPU part.
- GQA: a kv-head row reads the union of its G query heads' samples; each query head sees only its own samples
  with its own weights (log-weight -inf for a token sampled only for another head of the group).
- Output: tokens [B, H, K] (-1 = none) with log_weights [B, H, G, K]. K is the row capacity (every slot of
  the block table) unless ``max_tokens`` bounds it; then the exact tokens come first and the samples with the
  most collisions (over the group's heads) fill the rest (truncation: the estimate is then biased).
- Layers whose index is a multiple of ``dense_every`` read everything (MagicPIG keeps layers 0, 16, 32, ...
  dense); a step where ``sinks + window`` covers every slot of every row reads everything too (exact).

Differences from MagicPIG: MagicPIG keeps the sampled part's KV cache and its hash tables (sorted codes per
table, searched by bucket) in CPU memory and runs that attention on the CPU; here everything stays on the rows'
device and collisions are counted by comparing codes directly (same sample, different data structure). In
MagicPIG the prompt's last 64 tokens and *every generated token* stay in the exact GPU part and are never
hashed; here the exact window slides (tokens leaving it become sampleable, so the newest token's codes are
appended each step). MagicPIG shares one hyperplane matrix across layers; here each layer has its own (from
``seed``). The key mean is taken when the codes are (re)built (over the row's tokens between sinks and window)
and kept fixed, as MagicPIG fixes it at prefill. Codes are not refreshed if the engine quantizes keys later in
place (they stay those of the keys as first seen).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.select.base import PagedRows, Selection, SelectPolicy, SelectState

_BUDGET = 1 << 25  # elements of one chunk's intermediate (hash projections, collision compares)


@register("select", "lsh_sampling")
@dataclass(frozen=True)
class LSHSampling(SelectPolicy):
    """MagicPIG: read an LSH (SimHash) sample of each row with importance weights, plus sinks and window."""

    bits: int = param(10, "K: hyperplanes (bits) per hash table (MagicPIG: 10)")
    tables: int = param(150, "L: hash tables (MagicPIG: 150 for Llama-3.1-8B)")
    min_collisions: int = param(2, "a token is sampled if it collides with the query in this many tables (2)")
    sinks: int = param(4, "first tokens of each row always read exactly (MagicPIG: 4)")
    window: int = param(64, "newest tokens of each row always read exactly (MagicPIG: 64 local tokens)")
    center: bool = param(True, "hash keys minus their mean (MagicPIG centres the keys)")
    eps: float = param(1e-4, "log-weight is -log(u + eps) (MagicPIG's reference code: 1e-4; 0: -log u)")
    max_tokens: int = param(0, "tokens each row may read per step (0: the row capacity, no truncation)")
    dense_every: int = param(16, "layers whose index is a multiple of this read everything (0: none)")
    seed: int = param(0, "seed of the random hyperplanes (one matrix per layer)")

    stateful = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 31:
            raise ValueError(f"bits must be in 1..31, got {self.bits}")
        if self.tables < 1:
            raise ValueError(f"tables must be >= 1, got {self.tables}")
        if not 1 <= self.min_collisions <= self.tables:
            raise ValueError(f"min_collisions must be in 1..tables ({self.tables}), got {self.min_collisions}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 (the newest token is always read), got {self.window}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.max_tokens != 0 and self.max_tokens < self.sinks + self.window:
            raise ValueError(f"max_tokens must be 0 (row capacity) or >= sinks + window "
                             f"({self.sinks + self.window}), got {self.max_tokens}")
        if self.dense_every < 0:
            raise ValueError(f"dense_every must be >= 0, got {self.dense_every}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    # -- what the engine asks -------------------------------------------------------------------------------

    def _reads_all(self, layer: int, rows: PagedRows) -> bool:
        dense = self.dense_every > 0 and layer % self.dense_every == 0
        return dense or self.sinks + self.window >= rows.block_tables.shape[-1] * rows.block_size

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        tables = rows.block_tables.long()
        bsz, h, cap = tables.shape
        if state.per_seq and len(state.per_seq) != bsz:
            raise ValueError(f"lsh_sampling keeps per-sequence state: state.per_seq has {len(state.per_seq)} "
                             f"dicts for {bsz} sequences")
        key = ("lsh_sampling", layer)
        if self._reads_all(layer, rows):
            for ps in state.per_seq:  # codes are not kept up to date while everything is read: rebuild later
                ps.pop(key, None)
            return None
        bs, d = rows.block_size, rows.k.shape[-1]
        n = cap * bs
        dev = rows.k.device
        g = q.shape[1] // h
        planes = hyperplanes(self.seed, layer, d, self.bits * self.tables, dev)
        lengths = rows.lengths.long()
        idx = torch.arange(n, device=dev)[None, None, :]
        inrow = idx < lengths[:, :, None]  # [B, H, N]
        forced = inrow & ((idx < self.sinks) | (idx >= lengths[:, :, None] - self.window))

        codes, mean = self._codes(key, rows, tables, planes, state)

        # collisions of every token with each query head's codes, in chunks of tokens
        qg = q.view(bsz, h, g, d).float()
        qcodes = hash_codes(qg, planes, self.bits, self.tables)  # [B, H, G, L]
        cdt = torch.int16 if self.tables < 2**15 else torch.int32
        counts = torch.empty(bsz, h, g, n, dtype=cdt, device=dev)
        step = max(1, _BUDGET // max(1, bsz * h * g * self.tables))
        for s in range(0, n, step):
            e = min(n, s + step)
            counts[..., s:e] = (codes[:, :, None, s:e, :] == qcodes[:, :, :, None, :]).sum(-1, dtype=cdt)
        sampled = (counts >= self.min_collisions) & (inrow & ~forced)[:, :, None, :]  # [B, H, G, N]
        chosen = forced | sampled.any(2)  # [B, H, N]

        if self.max_tokens == 0 or self.max_tokens >= n:
            tokens = torch.where(chosen, idx.expand(bsz, h, n), -1)
        else:  # exact tokens first, then the samples with the most collisions; ties to the earlier token
            most = counts.amax(2).to(torch.int32)
            prio = torch.where(forced, self.tables + 1, torch.where(chosen, most, -1))
            prio, order = torch.sort(prio, dim=-1, descending=True, stable=True)
            tokens = torch.where(prio[..., : self.max_tokens] >= 0, order[..., : self.max_tokens], -1)
        valid = tokens >= 0
        tok = tokens.clamp(min=0)
        k = _gather_keys(rows, tables, tok)  # [B, H, K, D] fp32
        if mean is not None:
            k = k - mean[:, :, None, :]
        u = sample_probability(_cosine(qg, k), self.bits, self.tables, self.min_collisions)  # [B, H, G, K]
        lw = -torch.log(u + self.eps) if self.eps > 0 else -torch.log(u.clamp(min=1e-300))
        kk = tok.shape[-1]
        mine = sampled.gather(-1, tok[:, :, None, :].expand(bsz, h, g, kk))
        exact = (forced.gather(-1, tok) | ~valid)[:, :, None, :]
        log_weights = torch.where(exact, 0.0, torch.where(mine, lw, float("-inf"))).float()
        return Selection(tokens=tokens, log_weights=log_weights)

    def extra_bytes_read(self, layer: int, rows: PagedRows, state: SelectState) -> Tensor | None:
        """The stored codes of every token of each row (L codes of the storage dtype), plus its key mean."""
        if self._reads_all(layer, rows):
            return None
        per_token = self.tables * torch.empty((), dtype=code_dtype(self.bits)).element_size()
        extra = 4 * rows.k.shape[-1] if self.center else 0
        return rows.lengths.long() * per_token + extra

    # -- the kept codes -------------------------------------------------------------------------------------

    def _codes(self, key: tuple, rows: PagedRows, tables: Tensor, planes: Tensor,
               state: SelectState) -> tuple[Tensor, Tensor | None]:
        """codes [B, H, >= N, L] of every slot of each row (current through the newest token) and the key means
        [B, H, D] (None without centring), from the kept state where it is current; the state is updated."""
        bsz, h, cap = tables.shape
        bs, d = rows.block_size, rows.k.shape[-1]
        n = cap * bs
        dev = rows.k.device
        entries = [ps.get(key) for ps in state.per_seq] if state.per_seq else [None] * bsz
        steps = state.steps if len(state.steps) == bsz else None

        def current(i: int) -> bool:
            e = entries[i]
            return (e is not None and e["codes"].shape[1] == h and e["codes"].shape[3] == self.tables
                    and (steps is None or steps[i] == e["step"] + 1))

        ok = [current(i) for i in range(bsz)]
        first = entries[0]
        if all(ok) and all(e["codes"] is first["codes"] and e["row"] == i for i, e in enumerate(entries)) \
                and first["codes"].shape[0] == bsz:
            codes, mean = first["codes"], first["mean"]
            if codes.shape[2] < n:  # the rows grew past the kept slots: grow geometrically
                grow = max(n, codes.shape[2] + codes.shape[2] // 4) - codes.shape[2]
                codes = torch.nn.functional.pad(codes, (0, 0, 0, grow))
        else:
            codes = torch.zeros(bsz, h, n, self.tables, dtype=code_dtype(self.bits), device=dev)
            mean = torch.zeros(bsz, h, d, dtype=torch.float32, device=dev) if self.center else None
            sources: dict[int, list[int]] = {}
            for i, e in enumerate(entries):
                if ok[i]:
                    sources.setdefault(id(e["codes"]), []).append(i)
            for members in sources.values():  # one copy per kept batch tensor
                src = entries[members[0]]
                dst = torch.tensor(members, device=dev)
                at = torch.tensor([entries[i]["row"] for i in members], device=dev)
                m = min(n, src["codes"].shape[2])
                codes[dst, :, :m] = src["codes"][at, :, :m]
                if mean is not None:
                    mean[dst] = src["mean"][at]
            fresh = [i for i in range(bsz) if not ok[i]]
            if fresh:
                sub = torch.tensor(fresh, device=dev)
                c, mu = self._hash_rows(rows, tables[sub], rows.lengths[sub].long(), planes)
                codes[sub] = c
                if mean is not None:
                    mean[sub] = mu
        # the newest token of each row (already there for rows just hashed; writing it again changes nothing)
        newest = (rows.lengths.long() - 1).clamp(min=0)  # [B, H]
        k_new = _gather_keys(rows, tables, newest[:, :, None])[:, :, 0]  # [B, H, D]
        if mean is not None:
            k_new = k_new - mean
        c_new = hash_codes(k_new, planes, self.bits, self.tables)  # [B, H, L]
        codes.scatter_(2, newest[:, :, None, None].expand(bsz, h, 1, self.tables), c_new[:, :, None, :])
        for i, ps in enumerate(state.per_seq):
            ps[key] = {"codes": codes, "mean": mean, "row": i, "step": steps[i] if steps is not None else 0}
        return codes[:, :, :n], mean

    def _hash_rows(self, rows: PagedRows, tables: Tensor, lengths: Tensor,
                   planes: Tensor) -> tuple[Tensor, Tensor | None]:
        """Codes [b, H, N, L] of every slot of the given rows (tables [b, H, cap]) and their key means."""
        b, h, cap = tables.shape
        bs, d = rows.block_size, rows.k.shape[-1]
        n = cap * bs
        inside = torch.arange(cap, device=tables.device)[None, None, :] < (lengths[:, :, None] + bs - 1) // bs
        k = rows.k[torch.where(inside, tables, 0)].reshape(b, h, n, d).float()
        mean = None
        if self.center:
            idx = torch.arange(n, device=k.device)[None, None, :]
            mid = (idx >= self.sinks) & (idx < lengths[:, :, None] - self.window)
            mean = (k * mid[..., None]).sum(2) / mid.sum(2, keepdim=True).clamp(min=1)
            k = k - mean[:, :, None, :]
        out = torch.empty(b, h, n, self.tables, dtype=code_dtype(self.bits), device=k.device)
        step = max(1, _BUDGET // max(1, b * h * planes.shape[1]))
        for s in range(0, n, step):
            out[:, :, s: s + step] = hash_codes(k[:, :, s: s + step], planes, self.bits, self.tables)
        return out, mean


# -- pieces (module level so that tests can check them directly) ----------------------------------------------


@functools.lru_cache(maxsize=256)
def hyperplanes(seed: int, layer: int, d: int, count: int, device: torch.device) -> Tensor:
    """The layer's SimHash hyperplanes [D, count] (standard Gaussian), fixed by (seed, layer)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(d, count, generator=gen).to(device)


def code_dtype(bits: int) -> torch.dtype:
    """The smallest integer dtype holding a ``bits``-bit code."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


def hash_codes(x: Tensor, planes: Tensor, bits: int, tables: int) -> Tensor:
    """SimHash codes [..., L] of vectors x [..., D]: in each table, K sign bits (projection > 0) packed."""
    proj = torch.matmul(x.float(), planes)  # [..., L * K]
    signs = (proj > 0).view(*proj.shape[:-1], tables, bits).to(torch.int32)
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.int32, device=x.device),
                                       torch.arange(bits, dtype=torch.int32, device=x.device))
    return (signs * weights).sum(-1, dtype=torch.int32).to(code_dtype(bits))


def sample_probability(cos: Tensor, bits: int, tables: int, min_collisions: int) -> Tensor:
    """u = P[Binomial(L, p^K) >= m], p = 1 - arccos(cos) / π: the chance that a key at cosine ``cos`` from the
    query collides with it in at least m of L tables of K bits (float64, same shape as cos)."""
    c = cos.double().clamp(-1.0, 1.0)
    s = (1.0 - torch.arccos(c) / math.pi) ** bits  # per-table collision probability

    def term(j: int) -> Tensor:  # C(L, j) s^j (1 - s)^(L - j), in log space
        log_c = math.lgamma(tables + 1) - math.lgamma(j + 1) - math.lgamma(tables - j + 1)
        return torch.exp(log_c + torch.xlogy(float(j), s) + torch.special.xlog1py(float(tables - j), -s))

    below = sum(term(j) for j in range(min_collisions))  # P[X < m]
    direct = (1.0 - below).clamp(min=0.0)
    tail = sum(term(j) for j in range(min_collisions, min(tables, min_collisions + 7) + 1))  # small u: summed
    return torch.where(direct > 1e-6, direct, tail)


def _cosine(qg: Tensor, k: Tensor) -> Tensor:
    """cos(q_g, k_j) [B, H, G, K] of queries [B, H, G, D] and keys [B, H, K, D] (0 where a norm is 0)."""
    dot = torch.matmul(qg, k.transpose(-1, -2)).double()
    norms = qg.double().norm(dim=-1)[..., :, None] * k.double().norm(dim=-1)[..., None, :]
    return torch.where(norms > 0, dot / norms.clamp(min=1e-300), 0.0)


def _gather_keys(rows: PagedRows, tables: Tensor, tok: Tensor) -> Tensor:
    """Keys [B, H, K, D] (fp32) of the row tokens tok [B, H, K] (valid indices)."""
    bs, d = rows.block_size, rows.k.shape[-1]
    slots = tables.gather(-1, tok // bs).clamp(min=0) * bs + tok % bs
    return rows.k.reshape(-1, d)[slots].float()
