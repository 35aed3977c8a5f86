"""``kvzip``: keep what the model needs to reconstruct its context (Kim et al., arXiv:2505.23416).

Query-agnostic: after the context is cached, the model re-reads it from the cache. For each chunk of the
context it is fed a reconstruction prompt, then the chunk's own tokens (teacher-forced), attending to the
cache; a cached KV pair's importance is the largest attention it receives from those reconstruction
queries, over the queries and over the query heads of its kv group. Tokens are then kept by importance,
so the compressed cache does not depend on any later question.

As in the paper's code (``attention/score.py`` of snu-mllab/KVzip): the context is reconstructed in chunks of
``chunk`` tokens (2048 there); the first chunk's prompt is "Repeat the previous context exactly.", later
ones "Repeat the part of the previous context exactly, starting with" plus the previous chunk's last 8
tokens, each followed by the chat template's assistant-turn opening; the importance of a chunk's tokens is
the attention softmax over the sink tokens, the chunk and the reconstruction tokens only (the model's own
attention, which produces the hidden states, sees the whole cache); sink tokens are always kept.

In this engine (see :func:`compress`): the pass runs where a policy would evict (the end of the prompt, or of
each chunk of a chunked prefill; while decoding, once a row exceeds its budget + slack) and reconstructs
exactly the tokens not scored yet, so every token is scored once, by the reconstruction of its own chunk.
The reconstruction tokens are never stored: the pass attends to gathered copies of the rows and then drops
them. A shared prefix (``LLM.generate(..., share_prefix=True)``) is compressed once and each question
continues from a copy of the compressed document. Which rows keep how much is the budget allocator's choice
(uniform, pyramid, adaptive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from longctx.attention.reference import QUERY_CHUNK, attend, attention_probs
from longctx.device import tensor_on
from longctx.errors import LongctxError
from longctx.kv.registry import param, register
from longctx.kv.retain.base import KVView, RetainPolicy
from longctx.kv.rows import RowView
from longctx.kv.sequence import SequenceKV
from longctx.model.rope import Rotary

if TYPE_CHECKING:
    from longctx.engine.request import Request
    from longctx.model.decoder import CausalLM

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
PREVIOUS_TOKENS = 8  # tokens of the previous chunk quoted after REPEAT_NEXT
NO_TEMPLATE_SUFFIX = "\n"  # what follows the prompt when the tokenizer has no chat template


@register("retain", "kvzip")
@dataclass(frozen=True)
class KVzip(RetainPolicy):
    """Score tokens by the largest attention they get while the model repeats its context from the cache."""

    num_sinks: int = param(4, "first tokens always kept (and part of every chunk's scoring softmax)")
    chunk: int = param(2048, "context tokens reconstructed per scoring pass (each pass attends over the cache)")

    needs_reconstruction: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    @property
    def sinks(self) -> int:
        return self.num_sinks

    def score(self, view: KVView) -> Tensor:
        return view.key_mass  # the importance the reconstruction pass wrote (see compress)


# ---- the reconstruction prompt --------------------------------------------------------------------------


class _TextCodec(Protocol):
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs: Any) -> str: ...


@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of the reconstruction prompt: ``first`` / ``next`` instruction and the ``suffix`` after it."""

    first: list[int]
    next: list[int]
    suffix: list[int]

    @classmethod
    def for_tokenizer(cls, tokenizer: _TextCodec | None) -> RepeatPrompt:
        """The paper's prompts; the suffix is what the chat template puts after a user turn (the assistant
        turn's opening), or a newline without a template. Without a tokenizer (token-id models) the
        reconstruction input is the chunk's tokens alone."""
        if tokenizer is None:
            return cls([], [], [])
        suffix = NO_TEMPLATE_SUFFIX
        if getattr(tokenizer, "chat_template", None):
            mark = "\u2063KVZIP\u2063"
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True)
            except LongctxError:  # a template that cannot render one user turn: the plain suffix
                text = ""
            if mark in text:
                suffix = text.split(mark, 1)[1]
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        return cls(enc(REPEAT_FIRST), enc(REPEAT_NEXT), enc(suffix))


def reconstruction_inputs(prompt: RepeatPrompt, token_ids: Callable[[int, int], list[int]], start: int, end: int,
                          chunk: int) -> list[tuple[int, int, list[int]]]:
    """(chunk start, chunk end, input ids) of each pass reconstructing the tokens at positions [start, end).

    A chunk starting at 0 gets the first prompt; any other the "starting with" prompt quoting the
    ``PREVIOUS_TOKENS`` tokens before it; then the suffix, then the chunk's own tokens."""
    out = []
    for s in range(start, end, chunk):
        e = min(s + chunk, end)
        head = prompt.first if s == 0 else prompt.next + token_ids(max(0, s - PREVIOUS_TOKENS), s)
        out.append((s, e, head + prompt.suffix + token_ids(s, e)))
    return out


# ---- the pass ---------------------------------------------------------------------------------------------


class ReconstructionContext:
    """Attention context of one reconstruction forward of one sequence: the reconstruction tokens (at positions
    after the sequence's last one) attend to that layer's rows plus themselves, causally, through the plain
    reference attention; nothing is stored. Each layer's importance of the rows' tokens at positions
    [chunk_start, chunk_end) (max over queries and over the query heads of a kv group, softmax restricted to
    sinks + chunk + reconstruction tokens) is written into the rows' score slots."""

    def __init__(self, seq: SequenceKV, positions: Tensor, chunk_start: int, chunk_end: int, num_sinks: int) -> None:
        self.seq, self.positions = seq, positions
        self.chunk_start, self.chunk_end, self.num_sinks = chunk_start, chunk_end, num_sinks
        self.max_pos = int(positions[-1])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        seq, cfg, pos = self.seq, self.seq.cfg, self.positions
        n, hkv = q.shape[0], cfg.num_kv_heads
        group = cfg.num_heads // hkv
        rotate_at = seq._rotate_fn(rotary, self.max_pos + 1)
        view = seq.rows.gather(layer)
        rows = _with_appended(view, seq.positions.keys_to_store(k, pos, rotate_at), v, pos)
        qh = q.view(n, hkv, group, cfg.head_dim).permute(1, 2, 0, 3)  # [H, G, T, D]
        window = cfg.window_of(layer)
        logits_fn, mask_fn = seq._logits_and_mask(qh, pos, rows, window, rotate_at)
        out, _ = attend(n, logits_fn, mask_fn, rows.v, cfg.scale, cfg.attn_logit_softcapping)
        # the scoring softmax: sinks (first entries of each row), the chunk, the reconstruction tokens
        width = rows.k.shape[1]
        idx = torch.arange(width, device=rows.pos.device)[None, :]
        cached = idx < view.lengths[:, None]
        target = cached & (rows.pos >= self.chunk_start) & (rows.pos < self.chunk_end)
        scored = rows.valid & ((cached & (idx < self.num_sinks)) | target | ~cached)
        best = torch.zeros(hkv, width, dtype=torch.float32, device=rows.k.device)
        for s in range(0, n, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, n)
            p = attention_probs(logits_fn(s, e), mask_fn(s, e) & scored[:, None], cfg.scale,
                                cfg.attn_logit_softcapping)
            best = torch.maximum(best, p.amax(dim=(1, 2)))
        length = view.k.shape[1]
        seq.rows.write_scores(view, torch.where(target[:, :length], best[:, :length], view.score))
        return out.permute(2, 0, 1, 3).reshape(n, cfg.num_heads, cfg.head_dim)


def _with_appended(view: RowView, k: Tensor, v: Tensor, pos: Tensor) -> RowView:
    """``view`` with ``k``/``v`` [T, H, D] at positions ``pos`` [T] appended to every row, right after its own
    entries (as if they were stored): what the positions policy's logits and masks expect."""
    h, length, d = view.k.shape
    t = k.shape[0]
    width = length + t
    dev = view.k.device
    at = (view.lengths[:, None] + torch.arange(t, device=dev)[None, :])  # [H, T]
    keys = torch.zeros(h, width, d, dtype=view.k.dtype, device=dev)
    values = torch.zeros(h, width, d, dtype=view.v.dtype, device=dev)
    positions = torch.zeros(h, width, dtype=view.pos.dtype, device=dev)
    keys[:, :length], values[:, :length], positions[:, :length] = view.k, view.v, view.pos
    keys.scatter_(1, at[..., None].expand(h, t, d), k.permute(1, 0, 2).to(keys.dtype))
    values.scatter_(1, at[..., None].expand(h, t, d), v.permute(1, 0, 2).to(values.dtype))
    positions.scatter_(1, at, pos[None, :].expand(h, t).to(positions.dtype))
    lengths = view.lengths + t
    valid = torch.arange(width, device=dev)[None, :] < lengths[:, None]
    return RowView(k=keys, v=values, pos=positions, score=torch.zeros(h, width, device=dev), valid=valid,
                   lengths=lengths, slots=torch.zeros(h, width, dtype=torch.int64, device=dev))


def score_tokens(model: CausalLM, seq: SequenceKV, prompt: RepeatPrompt, token_ids: Callable[[int, int], list[int]],
                 num_tokens: int) -> None:
    """Reconstruct the tokens at positions [seq.reconstructed, num_tokens) in chunks and write their importance
    into the rows' score slots; the rows themselves do not change."""
    policy = seq.retain
    assert isinstance(policy, KVzip)
    device = next(model.parameters()).device
    for start, end, ids in reconstruction_inputs(prompt, token_ids, seq.reconstructed, num_tokens, policy.chunk):
        positions = torch.arange(num_tokens, num_tokens + len(ids), device=device)
        ctx = ReconstructionContext(seq, positions, start, end, policy.num_sinks)
        model(tensor_on(ids, torch.int64, device), ctx)  # type: ignore[arg-type]
    seq.reconstructed = max(seq.reconstructed, num_tokens)


def compression_due(seq: SequenceKV, is_prefill: bool) -> bool:
    """Whether the rows must be compressed after a step: where another policy would have evicted in it (a
    prompt or chunk end where a row is over its budget or a score-driven allocator re-splits; while decoding,
    a row over budget + slack; sliding rows count at most their window)."""
    if not seq.retain.needs_reconstruction or seq.head_budgets is None or seq.defer_eviction:
        return False
    if is_prefill and seq.budget.uses_scores:
        return True
    slack = 0 if is_prefill else seq.budget.slack
    if seq.rows.max_length_overall() <= seq._min_budget_all + slack:
        return False
    for layer in range(seq.cfg.num_layers):
        window = seq.cfg.window_of(layer)
        for n, b in zip(seq.rows.lengths[layer], seq.head_budgets[layer], strict=True):
            if (n if window is None else min(n, window)) > b + slack:
                return True
    return False


def compress(model: CausalLM, seq: SequenceKV, prompt: RepeatPrompt, token_ids: Callable[[int, int], list[int]],
             num_tokens: int, is_prefill: bool) -> None:
    """Score the tokens not scored yet by reconstruction, then evict every layer to its budget (sliding layers
    are first cut to their window, as before any eviction)."""
    score_tokens(model, seq, prompt, token_ids, num_tokens)
    layers = model.model.layers
    for layer in range(seq.cfg.num_layers):
        view = seq.rows.gather(layer)
        window = seq.cfg.window_of(layer)
        if window is not None:
            view = seq._trim_window(layer, view, window, exact=True)
        if seq._may_evict(layer, is_prefill, reconstructed=True):
            rotate_at = seq._rotate_fn(layers[layer].self_attn.rotary, num_tokens)
            seq._evict(layer, view, is_prefill, rotate_at, window)
        seq.rows.settle(layer)


def compress_after_step(model: CausalLM, tokenizer: _TextCodec | None, scheduled: Sequence[tuple[Request, int]],
                        was_prefill: Sequence[bool]) -> None:
    """The engine's hook after a forward: compress every scheduled request whose reconstruction policy is due
    (``was_prefill``: whether each request was still in its prompt when the step began)."""
    prompt: RepeatPrompt | None = None
    for (req, _), prefill in zip(scheduled, was_prefill, strict=True):
        seq = req.kv
        if not compression_due(seq, prefill):
            continue
        if prompt is None:
            prompt = RepeatPrompt.for_tokenizer(tokenizer)
        compress(model, seq, prompt, req.token_ids, req.num_computed_tokens, prefill)
