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


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (as vLLM): dividing by them overflows


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           prompt_ids: list[int] | None = None, output_ids: list[int] | None = None,
           banned: frozenset[int] | set[int] = frozenset()) -> int:
    """Pick one token id from ``logits`` [vocab] (fp32). ``banned`` ids are masked (stop ids before
    ``min_tokens``)."""
    logits = _adjusted(logits, params, prompt_ids, output_ids, banned)
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    return int(torch.multinomial(_filtered_probs(logits, params).cpu(), 1, generator=generator))


def sample_batch(logits: Tensor, rows: list[tuple[SamplingParams, torch.Generator | None, list[int], list[int],
                                                  frozenset[int] | set[int]]]) -> list[int]:
    """:func:`sample` for every row of ``logits`` [R, vocab] (row r with ``rows[r]`` = params, generator,
    prompt ids, output ids, banned ids), reading the device once: greedy rows take one argmax together,
    sampled rows' filtered probabilities cross to the host together and each draws with its own generator
    (the same draws as :func:`sample`)."""
    picked: list[int | None] = [None] * len(rows)
    plain = [i for i, (p, _, _, _, banned) in enumerate(rows) if p.temperature < GREEDY_BELOW and not p.penalized
             and not banned]
    plain_set = set(plain)
    special = [i for i in range(len(rows)) if i not in plain_set]
    greedy_adjusted, probs = [], []
    for i in special:
        params, _, prompt_ids, output_ids, banned = rows[i]
        adjusted = _adjusted(logits[i], params, prompt_ids, output_ids, banned)
        if params.temperature < GREEDY_BELOW:
            greedy_adjusted.append((i, torch.argmax(adjusted)))
        else:
            probs.append((i, _filtered_probs(adjusted, params)))
    on_device = []
    if plain:
        rows_plain = logits if len(plain) == len(rows) else logits[torch.tensor(plain, device=logits.device)]
        on_device.append(torch.argmax(rows_plain, dim=-1))
    if greedy_adjusted:
        on_device.append(torch.stack([t for _, t in greedy_adjusted]))
    host = torch.cat(on_device).tolist() if on_device else []
    for i, t in zip(plain + [i for i, _ in greedy_adjusted], host, strict=True):
        picked[i] = int(t)
    if probs:
        stacked = torch.stack([p for _, p in probs]).cpu()
        for (i, _), row in zip(probs, stacked, strict=True):
            picked[i] = int(torch.multinomial(row, 1, generator=rows[i][1]))
    return picked  # type: ignore[return-value]


def _adjusted(logits: Tensor, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int] | None,
              banned: frozenset[int] | set[int]) -> Tensor:
    if params.penalized:  # extreme penalties must not turn logits into inf (then NaN probabilities)
        big = torch.finfo(logits.dtype).max
        logits = apply_penalties(logits, params, prompt_ids or [], output_ids or []).clamp(-big, big)
    if banned:
        logits = logits.clone()
        logits[torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def _filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities after temperature and the min-p / top-k / top-p filters (on the logits' device)."""
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
        drop[0] = False  # the most likely token always stays (a top_p that rounds to 0 keeps just it)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return torch.softmax(logits, dim=-1)
