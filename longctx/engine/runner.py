"""The model runner: one forward pass over a packed batch, and sampling of the next tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.engine.context import BatchContext
from longctx.engine.request import Request
from longctx.model.decoder import CausalLM


class ModelRunner:
    """Runs scheduled (request, num_new_tokens) pairs through the model."""

    def __init__(self, model: CausalLM, device: torch.device) -> None:
        self.model = model
        self.device = device

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Request, int]], all_logits: bool = False) -> Tensor:
        """Feed each request its next ``n`` tokens; returns logits [num_requests, vocab] of each
        request's last fed token (or [num_tokens, vocab] for every fed token if ``all_logits``)."""
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        for req, n in scheduled:
            start = req.num_computed_tokens
            ids.extend(req.all_ids[start : start + n])
            pos.extend(range(start, start + n))
            cu.append(cu[-1] + n)
        ctx = BatchContext(
            seqs=[req.kv for req, _ in scheduled],
            cu_seqlens=cu,
            positions=torch.tensor(pos, dtype=torch.int64, device=self.device),
            is_prefill=[req.is_prefill for req, _ in scheduled],
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=self.device), ctx)
        for req, n in scheduled:
            req.num_computed_tokens += n
        if all_logits:
            return self.model.compute_logits(hidden)
        last = torch.tensor([c - 1 for c in cu[1:]], device=self.device)
        return self.model.compute_logits(hidden[last])
