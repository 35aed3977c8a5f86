"""Task ``ppl``: perplexity of long texts with the KV method active, by position.

Windows of ``length`` consecutive tokens are cut from the haystack text (the
seed picks the offsets). Each window is scored token by token with
:meth:`LLM.stream_logprobs`: the first ``prefill_tokens`` tokens are
prefilled, every later token is fed as a decode step, so a KV method evicts
exactly as it would while generating, and token ``t`` is predicted from what
the method kept of tokens ``< t``. For the plain ``full`` spec the cheap
one-pass variant (:meth:`LLM.prompt_logits`, one forward over the window) is
computed as well; the two agree up to float error, which the tests check.

Results are the mean negative log-likelihood (nats/token) and perplexity over
the window, and per position bucket (``num_buckets`` equal slices of the
window), with sums and counts so samples can be pooled token-weighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from longctx.errors import LongctxError
from longctx.eval.provenance import sha256_text
from longctx.kv.spec import KVSpec

PPL_TASK = "ppl"
FULL_SPEC = str(KVSpec.parse("full"))


@dataclass(frozen=True)
class PPLWindow:
    """One window of token ids cut from the haystack."""

    sample_id: str
    ids: tuple[int, ...]
    offset: int  # token offset in the tokenized haystack (BOS, if prepended, not counted)
    length: int  # requested length; len(ids) == length


def bucket_edges(length: int, num_buckets: int) -> list[int]:
    """``num_buckets + 1`` position edges splitting ``[0, length)`` into near-equal slices."""
    n = max(1, min(num_buckets, length))
    return [round(i * length / n) for i in range(n + 1)]


def nll_summary(logprobs: Tensor, prefill_tokens: int, length: int, num_buckets: int) -> dict[str, Any]:
    """Overall and per-bucket NLL of ``logprobs`` (for positions ``prefill_tokens .. length-1``)."""
    nll = (-logprobs.double()).numpy()
    positions = np.arange(prefill_tokens, prefill_tokens + len(nll))
    edges = bucket_edges(length, num_buckets)
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (positions >= lo) & (positions < hi)
        count = int(mask.sum())
        total = float(nll[mask].sum())
        buckets.append({"start": lo, "end": hi, "nll_sum": total, "count": count,
                        "nll": total / count if count else None,
                        "ppl": _safe_exp(total / count) if count else None})
    total, count = float(nll.sum()), len(nll)
    mean = total / count if count else math.nan
    return {"nll_sum": total, "count": count, "nll": mean, "ppl": _safe_exp(mean),
            "finite": bool(np.isfinite(nll).all()), "buckets": buckets}


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def one_pass_logprobs(llm: Any, ids: list[int]) -> Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one forward pass with the full cache."""
    logits = llm.prompt_logits(list(ids), kv="full").float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long, device=logp.device)
    return logp.gather(1, target[:, None])[:, 0].cpu()


class PerplexityTask:
    """Perplexity of haystack windows under a KV method (not a generation task: no questions)."""

    name: ClassVar[str] = PPL_TASK
    max_new_tokens: ClassVar[int] = 0
    kind: ClassVar[str] = "ppl"

    def __init__(self, num_buckets: int = 8, prefill_tokens: int = 1) -> None:
        if num_buckets < 1:
            raise LongctxError(f"ppl: num_buckets must be >= 1, got {num_buckets}")
        if prefill_tokens < 1:
            raise LongctxError(f"ppl: prefill_tokens must be >= 1, got {prefill_tokens}")
        self.num_buckets = num_buckets
        self.prefill_tokens = prefill_tokens
        self._token_cache: dict[tuple[int, str], list[int]] = {}

    def haystack_tokens(self, tokenizer: Any, haystack: str) -> list[int]:
        key = (id(tokenizer), sha256_text(haystack))
        if key not in self._token_cache:
            self._token_cache[key] = tokenizer.encode(" ".join(haystack.split()), add_special_tokens=False)
        return self._token_cache[key]

    def windows(self, tokenizer: Any, length: int, num_samples: int, seed: int, haystack: str) -> list[PPLWindow]:
        """``num_samples`` windows of exactly ``length`` tokens (BOS first when the tokenizer adds one)."""
        if length <= self.prefill_tokens:
            raise LongctxError(f"ppl: length {length} must exceed prefill_tokens={self.prefill_tokens}")
        tokens = self.haystack_tokens(tokenizer, haystack)
        bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
        need = length - len(bos)
        if len(tokens) < need:
            raise LongctxError(f"ppl: the haystack has {len(tokens)} tokens, too few for windows of {length} tokens; "
                               f"give a longer text with --haystack or use shorter --lengths")
        rng = np.random.default_rng([seed, length, 0x9B1])
        offsets = rng.integers(0, len(tokens) - need + 1, size=num_samples)
        return [PPLWindow(f"{PPL_TASK}-L{length}-s{seed}-{i}-o{int(off)}", tuple(bos + tokens[off:off + need]),
                          int(off), length) for i, off in enumerate(offsets)]

    def evaluate(self, llm: Any, windows: list[PPLWindow], spec: str | KVSpec,
                 one_pass: bool | None = None, progress: bool = False) -> list[dict[str, Any]]:
        """Score every window under ``spec`` in one batched ``stream_logprobs`` call.

        ``one_pass`` (default: when ``spec`` is plain ``full``) adds the one-forward-pass PPL as
        ``one_pass`` for comparison.
        """
        canonical = str(KVSpec.parse(spec))
        if one_pass is None:
            one_pass = canonical == FULL_SPEC
        streams = llm.stream_logprobs([list(w.ids) for w in windows], kv=canonical,
                                      prefill_tokens=self.prefill_tokens, progress=progress)
        results = []
        for w, lp in zip(windows, streams, strict=True):
            res = nll_summary(lp, self.prefill_tokens, w.length, self.num_buckets)
            res["prefill_tokens"] = self.prefill_tokens
            res["mode"] = "stream"
            if one_pass:
                ref = one_pass_logprobs(llm, list(w.ids))[self.prefill_tokens - 1:]
                res["one_pass"] = {k: v for k, v in nll_summary(ref, self.prefill_tokens, w.length,
                                                                  self.num_buckets).items() if k != "buckets"}
            results.append(res)
        return results
