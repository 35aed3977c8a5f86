"""The model runner: one forward pass over a packed batch, and sampling of the next tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.device import tensor_on
from longctx.engine.context import BatchContext
from longctx.engine.cuda_graph import DecodeGraphs
from longctx.engine.fast_decode import FastDecodeContext, can_fast_decode, decode_attention_fn, prepare_decode
from longctx.engine.request import Request
from longctx.model.decoder import CausalLM


class ModelRunner:
    """Runs scheduled (request, num_new_tokens) pairs through the model."""

    def __init__(self, model: CausalLM, device: torch.device, fast_decode: bool = True,
                 use_cuda_graphs: bool = True) -> None:
        self.model = model
        self.device = device
        self.fast_decode = fast_decode
        self.decode_attention = decode_attention_fn(device)
        self.graphs = DecodeGraphs(model, self.decode_attention) if device.type == "cuda" and use_cuda_graphs else None

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Request, int]], all_logits: bool = False) -> Tensor:
        """Feed each request its next ``n`` tokens; returns logits [num_requests, vocab] of each
        request's last fed token (or [num_tokens, vocab] for every fed token if ``all_logits``)."""
        if not all_logits and self._is_fast_decode(scheduled):
            return self._run_fast_decode(scheduled)
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        for req, n in scheduled:
            start = req.num_computed_tokens
            ids.extend(req.token_ids(start, start + n))
            pos.extend(range(start, start + n))
            cu.append(cu[-1] + n)
        ctx = BatchContext(
            seqs=[req.kv for req, _ in scheduled],
            cu_seqlens=cu,
            positions=tensor_on(pos, torch.int64, self.device),
            is_prefill=[req.is_prefill for req, _ in scheduled],
            max_positions=[req.num_computed_tokens + n - 1 for req, n in scheduled],
        )
        hidden = self.model(tensor_on(ids, torch.int64, self.device), ctx)
        for req, n in scheduled:
            req.num_computed_tokens += n
        if all_logits:
            return self.model.compute_logits(hidden)
        last = tensor_on([c - 1 for c in cu[1:]], torch.int64, self.device)
        return self.model.compute_logits(hidden[last])

    def _is_fast_decode(self, scheduled: list[tuple[Request, int]]) -> bool:
        if not self.fast_decode or any(n != 1 or req.is_prefill for req, n in scheduled):
            return False
        return can_fast_decode([req.kv for req, _ in scheduled], self.model.config)

    def _run_fast_decode(self, scheduled: list[tuple[Request, int]]) -> Tensor:
        seqs = [req.kv for req, _ in scheduled]
        positions = [req.num_computed_tokens for req, _ in scheduled]
        ids = [req.token_ids(p, p + 1)[0] for (req, _), p in zip(scheduled, positions, strict=True)]
        ids = tensor_on(ids, torch.int64, self.device, idle=True)
        meta = prepare_decode(seqs, positions, self.device)
        if self.graphs is not None:
            logits, ctx = self.graphs.run(seqs, ids, meta)
        else:
            ctx = FastDecodeContext(seqs, meta, self.model.config, self.decode_attention)
            logits = self.model.compute_logits(self.model(ids, ctx))
        ctx.finish()
        for req, _ in scheduled:
            req.num_computed_tokens += 1
        return logits
