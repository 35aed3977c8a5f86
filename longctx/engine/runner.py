"""The model runner: one forward pass over a packed batch of scheduled (request, num_new_tokens) pairs.

Three shapes of step, one entry point (:meth:`ModelRunner.run`): all rows decoding one token on the batched
paged path (CUDA graphs on a GPU); a mixed step whose decode rows take that same batched path while its
prompt chunks attend through their sequences (:class:`MixedContext`); and the per-sequence path for
everything else (decode rows whose KV method the batched path cannot run, all-logits scoring).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.device import tensor_on
from longctx.engine.context import BatchContext
from longctx.engine.cuda_graph import DecodeGraphs
from longctx.engine.fast_decode import FastDecodeContext, can_fast_decode, decode_attention_fn, prepare_decode
from longctx.engine.request import Request
from longctx.engine.select_step import can_capture
from longctx.model.decoder import CausalLM
from longctx.model.rope import Rotary


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
        if not all_logits and self.fast_decode:
            decode = [i for i, (req, n) in enumerate(scheduled) if n == 1 and not req.is_prefill]
            if decode and can_fast_decode([scheduled[i][0].kv for i in decode], self.model.config):
                return self._run_mixed(scheduled, decode)
        ids, ctx = self._per_sequence(scheduled)
        hidden = self.model(tensor_on(ids, torch.int64, self.device), ctx)
        for req, n in scheduled:
            req.num_computed_tokens += n
        if all_logits:
            return self.model.compute_logits(hidden)
        last = tensor_on([c - 1 for c in ctx.cu_seqlens[1:]], torch.int64, self.device)
        return self.model.compute_logits(hidden[last])

    def _per_sequence(self, scheduled: list[tuple[Request, int]]) -> tuple[list[int], BatchContext]:
        """The packed token ids of ``scheduled`` and the context that attends them sequence by sequence."""
        ids: list[int] = []
        pos: list[int] = []
        cu = [0]
        for req, n in scheduled:
            start = req.num_computed_tokens
            ids.extend(req.token_ids(start, start + n))
            pos.extend(range(start, start + n))
            cu.append(cu[-1] + n)
        return ids, BatchContext(
            seqs=[req.kv for req, _ in scheduled],
            cu_seqlens=cu,
            positions=tensor_on(pos, torch.int64, self.device),
            is_prefill=[req.is_prefill for req, _ in scheduled],
            max_positions=[req.num_computed_tokens + n - 1 for req, n in scheduled],
        )

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
        if self.graphs is not None and can_capture(seqs):
            logits, ctx = self.graphs.run(seqs, ids, meta)
        else:
            ctx = FastDecodeContext(seqs, meta, self.model.config, self.decode_attention)
            logits = self.model.compute_logits(self.model(ids, ctx))
        ctx.finish()
        for req, _ in scheduled:
            req.num_computed_tokens += 1
        return logits

    def _run_mixed(self, scheduled: list[tuple[Request, int]], decode: list[int]) -> Tensor:
        """A step with prompt chunks and decode tokens: the decode rows attend through the batched paged path
        (as in a pure decode step), the prompt chunks through their sequences' own attention, in one forward."""
        is_decode = set(decode)
        prefill = [i for i in range(len(scheduled)) if i not in is_decode]
        dec = [scheduled[i][0] for i in decode]
        positions = [r.num_computed_tokens for r in dec]
        ids = [r.token_ids(p, p + 1)[0] for r, p in zip(dec, positions, strict=True)]
        chunk_ids, slow = self._per_sequence([scheduled[i] for i in prefill])
        seqs = [r.kv for r in dec]
        fast = FastDecodeContext(seqs, prepare_decode(seqs, positions, self.device), self.model.config,
                                 self.decode_attention)
        hidden = self.model(tensor_on(ids + chunk_ids, torch.int64, self.device), MixedContext(fast, slow, len(dec)))
        fast.finish()
        for req, n in scheduled:
            req.num_computed_tokens += n
        last = [0] * len(scheduled)  # row of each request's last token, in the scheduled order
        for j, i in enumerate(decode):
            last[i] = j
        for j, i in enumerate(prefill):
            last[i] = len(dec) + slow.cu_seqlens[j + 1] - 1
        return self.model.compute_logits(hidden[tensor_on(last, torch.int64, self.device)])


class MixedContext:
    """Attention context of a mixed step: the first ``num_decode`` packed tokens are decode rows
    (:class:`FastDecodeContext`), the rest prompt chunks (:class:`BatchContext`)."""

    def __init__(self, fast: FastDecodeContext, slow: BatchContext, num_decode: int) -> None:
        self.fast, self.slow, self.num_decode = fast, slow, num_decode

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        d = self.num_decode
        return torch.cat([self.fast.attend(layer, q[:d], k[:d], v[:d], rotary),
                          self.slow.attend(layer, q[d:], k[d:], v[d:], rotary)])
