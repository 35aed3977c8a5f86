"""Token sampling for one request: penalties, greedy, temperature, min-p, top-k and top-p, with a
per-request generator for seeds. The order follows vLLM: penalties on the raw logits, then
temperature, then the min-p / top-k / top-p filters."""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.engine.sampling import SamplingParams


def apply_penalties(logits: Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> Tensor:
    """Repetition penalty over prompt + output tokens; presence / frequency penalties over output tokens."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           prompt_ids: list[int] | None = None, output_ids: list[int] | None = None,
           banned: frozenset[int] | set[int] = frozenset()) -> int:
    """Pick one token id from ``logits`` [vocab] (fp32). ``banned`` ids are masked (stop ids before
    ``min_tokens``)."""
    if params.penalized:
        logits = apply_penalties(logits, params, prompt_ids or [], output_ids or [])
    if banned:
        logits = logits.clone()
        logits[torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)] = float("-inf")
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first token past top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
