"""Retrieval-head scores by a copy-paste probe (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
Factuality", arXiv:2404.15574), plus attention-sink statistics and RazorAttention's echo / induction scores.

Each prompt hides a needle (random words) in a haystack and then repeats it, teacher-forced. At every query
that predicts a needle token ``w``, a query head *copy-pastes* when its top attention lands on a needle token
equal to ``w``; the paper counts these events only while the model actually emits ``w`` (``require_correct``).
A head's retrieval score is its copy-paste events over the needle tokens, averaged over the prompts; a kv-head
(one cache row) gets the largest score of its query heads, since one retrieval query head is enough to need the
row in full.

The same pass records, per head, the mean attention mass on the first ``sinks`` tokens and on the last
``window`` tokens of the last queries (``sink_mass``, ``local_mass``), and RazorAttention's (Tang et al.,
arXiv:2407.15891) ``induction`` (mass on the token after the earlier occurrence of the current token: the
needle token being copied) and ``echo`` (mass on the earlier occurrence of the current token itself) scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from longctx.heads.contexts import ProbeContext
from longctx.heads.prompts import PromptMaker
from longctx.heads.store import HeadScores


@dataclass(frozen=True)
class RetrievalSettings:
    """Probe settings (all recorded in the score file)."""

    samples: int = 8
    length: int = 1024
    needle_words: int = 12
    require_correct: bool = True
    sinks: int = 4
    window: int = 64
    stat_queries: int = 64
    seed: int = 0


def score_retrieval(model: Any, tokenizer: Any, settings: RetrievalSettings, model_sha256: str, model_name: str,
                    progress: Callable[[int], None] | None = None) -> HeadScores:
    """Run the copy-paste probe on ``model`` (a :class:`~longctx.model.decoder.CausalLM`), weights untouched."""
    cfg = model.config
    device = next(model.parameters()).device
    L, H, Hq = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads
    group = Hq // H
    rng = random.Random(settings.seed)
    maker = PromptMaker(tokenizer, cfg.vocab_size, cfg.bos_token_id)
    sums = {name: torch.zeros(L, H, group, dtype=torch.float64) for name in
            ("retrieval", "sink_mass", "local_mass", "induction", "echo")}
    for i in range(settings.samples):
        depth = (i + 0.5) / settings.samples
        p = maker.copy_prompt(settings.length, depth, settings.needle_words, rng)
        n, m = len(p.ids), len(p.needle)
        copy_rows = torch.arange(p.copy_start - 1, p.copy_start + m - 1)  # row t predicts needle[t]
        stat_rows = torch.arange(max(n - settings.stat_queries, 0), n)
        rows = torch.cat([copy_rows, stat_rows])
        ids = torch.tensor(p.ids, device=device)
        needle = torch.tensor(p.needle)
        is_needle = torch.zeros(n, dtype=torch.bool)
        is_needle[p.needle_start : p.needle_start + m] = True
        per_layer: dict[int, torch.Tensor] = {}

        def probe(layer: int, _rows: torch.Tensor, probs: torch.Tensor, per_layer: dict = per_layer) -> None:
            per_layer[layer] = probs.cpu()  # [H, G, rows, n]

        with torch.no_grad():
            hidden = model(ids, ProbeContext(cfg, n, device, rows, probe))
            predicted = model.compute_logits(hidden[copy_rows.to(device)]).argmax(-1).cpu()
        correct = predicted == needle if settings.require_correct else torch.ones(m, dtype=torch.bool)
        ids_cpu = ids.cpu()
        for layer in range(L):
            probs = per_layer[layer]
            copy_p, stat_p = probs[:, :, :m], probs[:, :, m:]
            top = copy_p.argmax(-1)  # [H, G, m]
            hit = is_needle[top] & (ids_cpu[top] == needle[None, None, :]) & correct[None, None, :]
            sums["retrieval"][layer] += hit.sum(-1).double() / m
            t = torch.arange(m)
            sums["induction"][layer] += copy_p[:, :, t, p.needle_start + t].mean(-1).double()
            if m > 1:
                sums["echo"][layer] += copy_p[:, :, t[1:], p.needle_start + t[1:] - 1].mean(-1).double()
            sums["sink_mass"][layer] += stat_p[..., : settings.sinks].sum(-1).mean(-1).double()
            k_pos = torch.arange(n)
            diff = stat_rows[:, None] - k_pos[None, :]
            local_mask = (diff < settings.window) & (diff >= 0)
            sums["local_mass"][layer] += (stat_p * local_mask).sum(-1).mean(-1).double()
        if progress is not None:
            progress(1)
    avg = {k: v / settings.samples for k, v in sums.items()}
    kv = {k: (v.amax(-1) if k in ("retrieval", "induction", "echo") else v.mean(-1)) for k, v in avg.items()}
    extra = {k: v.tolist() for k, v in kv.items() if k != "retrieval"}
    return HeadScores(method="retrieval", model_sha256=model_sha256, model_name=model_name, num_layers=L,
                      num_kv_heads=H, num_heads=Hq, settings=asdict(settings), scores=kv["retrieval"].tolist(),
                      extra=extra)
