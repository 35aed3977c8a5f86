"""``LLM``: the Python API. Load a model once, generate for batches of prompts, each with its own KV method.

    >>> llm = LLM("model.gguf")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8), kv="snapkv:1024")
    >>> out[0].text, out[0].stats.kv_bytes_held
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from longctx.engine.request import CompletionOutput, Request, RequestOutput, RequestStats
from longctx.engine.runner import ModelRunner
from longctx.engine.sampler import sample
from longctx.engine.sampling import SamplingParams
from longctx.engine.scheduler import Scheduler
from longctx.errors import LongctxError, PromptTooLongError
from longctx.kv.pool import BlockPool
from longctx.kv.sequence import SequenceKV, kv_bytes_for_tokens
from longctx.kv.spec import KVSpec
from longctx.model.loader import LoadedModel, load_model

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]
MIN_SHARED_PREFIX = 128  # tokens; shorter common prefixes are cheaper to recompute than to copy
EXTENDING_POSITIONS = ("self_extend", "lm_infinite", "linear", "ntk", "yarn", "rerotate")


class LLM:
    """A loaded model plus its KV block pool.

    Args:
        model: a Hugging Face checkpoint folder or a ``.gguf`` file.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: ``fp32``, ``bf16``, ``fp16`` (weights and KV cache) or ``auto`` (fp32 on the CPU, bf16 on a GPU).
        block_size: tokens per KV block.
        max_kv_bytes: cap on KV pool memory (the pool grows on demand up to it).
        max_num_seqs: most requests running at once.
        max_model_len: longest prompt + output accepted (default and upper bound: the model's context,
            unless a positions method extends it).
    """

    def __init__(self, model: str | Path | LoadedModel, device: str = "cpu", dtype: str | torch.dtype = "fp32",
                 block_size: int = 16, max_kv_bytes: int = 8 << 30, max_num_seqs: int = 64,
                 preallocate_kv: bool = False, max_model_len: int | None = None) -> None:
        """``model`` may also be an already built :class:`LoadedModel` (e.g. random weights for benchmarks;
        its tokenizer may then be None and prompts must be token ids). ``preallocate_kv`` sizes the
        pool at ``max_kv_bytes`` up front instead of growing it (needed for CUDA-graph replays)."""
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs), ("max_kv_bytes", max_kv_bytes),
                            ("max_model_len", 1 if max_model_len is None else max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LongctxError(f"{name} must be a positive integer, got {value!r}")
        if dtype == "auto":
            dtype = "fp32" if torch.device(device).type == "cpu" else "bf16"
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        self.model, self.config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.model.fuse_projections()  # q/k/v and gate/up as one GEMM each (parameters become views)
        self.source = loaded.source
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype
        cfg = self.config
        bytes_per_block = 2 * block_size * cfg.head_dim * torch.finfo(self.dtype).bits // 8
        max_blocks = max_kv_bytes // bytes_per_block
        if max_blocks < 2:
            raise LongctxError(f"max_kv_bytes={max_kv_bytes} is below two KV blocks ({2 * bytes_per_block} bytes)")
        self.pool = BlockPool(cfg.head_dim, block_size=block_size,
                              num_blocks=max_blocks if preallocate_kv else min(256, max_blocks),
                              max_blocks=max_blocks, dtype=self.dtype, device=self.device)
        self.runner = ModelRunner(self.model, self.device)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self._next_id = 0

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling defaults of the checkpoint's ``generation_config.json`` (as vLLM reads them):
        ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens``;
        greedy unless it sets ``do_sample: true`` (Hugging Face's meaning). Used when a call passes no
        ``sampling_params``."""
        gen = self.tokenizer.generation_config if self.tokenizer is not None else {}
        keys = {"top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                "max_new_tokens": "max_tokens"}
        values: dict[str, Any] = {ours: gen[theirs] for theirs, ours in keys.items() if gen.get(theirs) is not None}
        if gen.get("do_sample") is True and gen.get("temperature") is not None:
            values["temperature"] = gen["temperature"]
        try:
            return SamplingParams(**values)
        except (ValueError, TypeError) as e:
            raise LongctxError(f"{self.source}: generation_config.json has an invalid sampling default: {e}") from None

    # ---- prompts -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: text, a list of token ids, or vLLM's ``{"prompt": text}`` /
        ``{"prompt_token_ids": [...]}``; ``chat`` wraps a text prompt as one user turn."""
        if isinstance(prompt, dict):
            if set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
                prompt = prompt["prompt"]
            elif set(prompt) == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], list):
                prompt = prompt["prompt_token_ids"]
            else:
                raise LongctxError(f"a dict prompt must be {{'prompt': str}} or {{'prompt_token_ids': list[int]}}, "
                                   f"got keys {sorted(map(str, prompt))} (for chat messages use LLM.chat)")
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                kinds = sorted({type(t).__name__ for t in prompt if not isinstance(t, int) or isinstance(t, bool)})
                raise LongctxError(f"a token-id prompt must be a list of ints, got elements of type {', '.join(kinds)}"
                                   " (for chat messages use LLM.chat)")
            if not prompt:
                raise LongctxError("empty prompt")
            bad = [t for t in prompt if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise LongctxError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
            return [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise LongctxError(f"a prompt must be a str, a list of token ids or a dict with 'prompt' or "
                               f"'prompt_token_ids', got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise LongctxError("this model has no tokenizer: pass prompts as token ids")
        ids = self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        if not ids:
            raise LongctxError("empty prompt")
        return ids

    def _check_length(self, ids: list[int], spec: KVSpec) -> None:
        limit = self.max_model_len
        if len(ids) > limit and not self._extends_context(spec):
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens but the context is {limit} (max_model_len); shorten it or use a "
                f"positions method that extends the context (e.g. --kv 'positions=self_extend(group=4,window=1024)'); "
                f"set LONGCTX_ALLOW_BEYOND_CONTEXT=1 to run plain RoPE past it anyway"
            )

    def _extends_context(self, spec: KVSpec) -> bool:
        """Whether positions beyond the trained context are allowed for ``spec`` on this model (always, when
        the environment sets LONGCTX_ALLOW_BEYOND_CONTEXT=1, e.g. to measure plain RoPE past its range)."""
        if os.environ.get("LONGCTX_ALLOW_BEYOND_CONTEXT") == "1":
            return True
        return spec.positions.name in EXTENDING_POSITIONS or self.config.rope.rope_type in ("dynamic", "yarn")

    def _make_request(self, prompt: Prompt, params: SamplingParams, spec: KVSpec, chat: bool,
                      ids: list[int] | None = None, index: int = 0) -> Request:
        """A request for ``prompt`` (already encoded when ``ids`` is given); ``index`` is the completion's
        number among the prompt's ``n`` (it offsets the seed)."""
        ids = self.encode(prompt, chat) if ids is None else ids
        self._check_length(ids, spec)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.stop_ids if self.tokenizer is not None else ())
        gen = None
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(params.seed + index if params.seed is not None
                            else int.from_bytes(os.urandom(8), "little") >> 1)
        req = Request(self._next_id, prompt, ids, params, SequenceKV(self.pool, self.config, spec, len(ids)),
                      frozenset(stop_ids), generator=gen, logprobs=[] if params.logprobs is not None else None,
                      prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self._next_id += 1
        return req

    # ---- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        kv: str | KVSpec | Sequence[str | KVSpec] = "full",
        chat: bool = False,
        progress: bool = False,
        share_prefix: bool = True,
        *,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``).
        ``sampling_params`` (also accepted as ``params``) and ``kv`` may be one value for all prompts or one
        per prompt; each prompt may run a different KV method in the same batch. Each prompt gets
        ``sampling_params.n`` completions in ``RequestOutput.outputs``.

        With ``share_prefix``, requests with the same KV spec whose prompts share a long common prefix
        (a context asked several questions) prefill it once; each then continues from a copy. Eviction
        is deferred to the end of each prompt, so results equal prefilling every prompt separately."""
        if sampling_params is not None and params is not None:
            raise LongctxError("pass sampling_params or params, not both")
        sampling_params = sampling_params if sampling_params is not None else params
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not isinstance(prompts, Sequence):
            raise LongctxError(f"prompts must be a str, a list of token ids, a dict or a list of those, "
                               f"got {type(prompts).__name__}")
        prompts = list(prompts)
        encoded = [(p, self.encode(p, chat)) for p in prompts]
        return self._run(encoded, sampling_params, kv, progress, share_prefix)

    @torch.inference_mode()
    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        kv: str | KVSpec | Sequence[str | KVSpec] = "full",
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        progress: bool = False,
        share_prefix: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages: system, user,
        assistant, tool) or to a list of conversations, rendered with the checkpoint's chat template
        (``tools`` and ``chat_template_kwargs`` such as ``enable_thinking`` are passed to it)."""
        if self.tokenizer is None:
            raise LongctxError("this model has no tokenizer, so it cannot render chat messages")
        if isinstance(messages, Sequence) and messages and isinstance(messages[0], dict):
            conversations = [messages]
        elif isinstance(messages, Sequence) and not isinstance(messages, str) and messages:
            conversations = list(messages)
        else:
            raise LongctxError(f"messages must be a non-empty list of message dicts or a list of conversations, "
                               f"got {type(messages).__name__}")
        encoded = []
        for conv in conversations:
            if not isinstance(conv, Sequence) or isinstance(conv, str):
                raise LongctxError(f"a conversation must be a list of message dicts, got {type(conv).__name__}")
            text = self.tokenizer.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt,
                                                      tools=tools, **(chat_template_kwargs or {}))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if not ids:
                raise LongctxError("the chat template rendered an empty prompt")
            encoded.append((text, ids))
        return self._run(encoded, sampling_params, kv, progress, share_prefix)

    def _run(self, encoded: list[tuple[Prompt, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             kv: str | KVSpec | Sequence[str | KVSpec], progress: bool, share_prefix: bool) -> list[RequestOutput]:
        """The one generation loop behind ``generate`` and ``chat``: ``n`` requests per prompt, shared
        prefixes prefilled once, every block released whatever happens."""
        n = len(encoded)
        params_list = _per_prompt(sampling_params or self.get_default_sampling_params(), n, "sampling_params")
        for sp in params_list:
            if not isinstance(sp, SamplingParams):
                raise LongctxError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        specs = [KVSpec.parse(s) for s in _per_prompt(kv, n, "kv")]
        for (_, ids), spec in zip(encoded, specs, strict=True):
            self._check_length(ids, spec)
        groups: list[list[Request]] = []
        requests: list[Request] = []
        scheduler = Scheduler(self.max_num_seqs)
        bar = tqdm(total=sum(sp.max_tokens * sp.n for sp in params_list), desc="generating", unit="tok",
                   disable=not progress)
        try:
            for (prompt, ids), sp, spec in zip(encoded, params_list, specs, strict=True):
                group = [self._make_request(prompt, sp, spec, False, ids=ids, index=i) for i in range(sp.n)]
                groups.append(group)
                requests.extend(group)
            if share_prefix:
                self._prefill_shared_prefixes(requests)
            for r in requests:
                scheduler.add(r)
            while scheduler.has_unfinished:
                self._step(scheduler, bar)
        finally:
            bar.close()
            # An exception or interrupt anywhere above must not leak blocks: release every request (running,
            # waiting, or built but never scheduled); finished ones already hold nothing (release is idempotent).
            for r in requests:
                r.kv.release()
        return [self._group_output(g) for g in groups]

    def _prefill_shared_prefixes(self, requests: list[Request], min_shared: int = MIN_SHARED_PREFIX) -> None:
        groups: list[tuple[int, list[Request]]] = []  # (shared prefix length, members)
        for req in requests:
            if not req.kv.can_fork or req.prompt_logprobs is not None:  # its prompt positions must be computed
                continue
            for i, (shared, members) in enumerate(groups):
                head = members[0]
                if head.kv.spec != req.kv.spec:
                    continue
                lcp = _common_prefix(head.prompt_ids, req.prompt_ids, shared)
                if lcp >= min_shared:
                    groups[i] = (lcp, [*members, req])
                    break
            else:
                groups.append((len(req.prompt_ids), [req]))
        for shared, members in groups:
            shared = min(shared, *(len(m.prompt_ids) - 1 for m in members))
            if len(members) < 2 or shared < min_shared:
                continue
            head = members[0]
            base = Request(-1, head.prompt_ids[:shared], head.prompt_ids[:shared], SamplingParams(max_tokens=1),
                           SequenceKV(self.pool, self.config, head.kv.spec, shared), frozenset())
            base.kv.defer_eviction = True
            try:
                self.runner.run([(base, shared)])
                for m in members:
                    m.kv.fork_from(base.kv)
                    m.num_computed_tokens = shared
            finally:
                base.kv.release()  # members that forked are released by the caller on failure

    def _step(self, scheduler: Scheduler, bar: tqdm) -> None:
        scheduled = scheduler.schedule()
        if any(req.prompt_logprobs is not None and req.is_prefill for req, _ in scheduled):
            logits = self._run_with_prompt_logprobs(scheduled)
        else:
            logits = self.runner.run(scheduled)
        # Sampling reads the tokens back, so it waits for the step's GPU work: time stamps come after it
        # (the host may run far ahead of the GPU during a prefill).
        tokens = [None if req.is_prefill else self._sample(req, row)
                  for (req, _), row in zip(scheduled, logits, strict=True)]
        now = time.perf_counter()
        for (req, _), token in zip(scheduled, tokens, strict=True):
            if token is None:
                continue  # a prompt chunk that does not end the prompt samples nothing
            if not req.output_ids:
                req.kv.snapshot(final=False)
                req.first_token_time = now
            req.output_ids.append(token)
            bar.update(1)
            self._check_stop(req, token)
            if req.is_finished:
                req.finish_time = now
                bar.update(req.params.max_tokens - len(req.output_ids))
                scheduler.finish(req)

    def _run_with_prompt_logprobs(self, scheduled: list[tuple[Request, int]]) -> Tensor:
        """A step that keeps every position's logits, records the prompt tokens' log-probabilities of the
        requests that asked for them and returns the last row per request like ``runner.run``."""
        starts = [req.num_computed_tokens for req, _ in scheduled]
        every = self.runner.run(scheduled, all_logits=True)
        last, offset = [], 0
        for (req, n), start in zip(scheduled, starts, strict=True):
            rows = every[offset : offset + n]
            offset += n
            last.append(rows[-1])
            if req.prompt_logprobs is None or start >= req.num_prompt_tokens:
                continue
            # the logits at position p predict token p + 1: rows up to the prompt's last token count
            targets = req.prompt_ids[start + 1 : min(start + n, req.num_prompt_tokens - 1) + 1]
            logp = torch.log_softmax(rows[: len(targets)].float(), dim=-1)
            picked = logp.gather(1, torch.tensor(targets, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
            k = min(req.params.prompt_logprobs or 0, logp.shape[-1])
            top = torch.topk(logp, k) if k else None
            for j, (token, value) in enumerate(zip(targets, picked, strict=True)):
                entry = {token: value}
                if top is not None:
                    entry.update(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
                req.prompt_logprobs.append(entry)
        return torch.stack(last)

    def _sample(self, req: Request, row: Tensor) -> int:
        params = req.params
        banned = req.stop_ids if len(req.output_ids) < params.min_tokens else frozenset()
        token = sample(row, params, req.generator, req.prompt_ids, req.output_ids, banned)
        if req.logprobs is not None:
            logp = torch.log_softmax(row.float(), dim=-1)
            entry = {token: float(logp[token])}
            if params.logprobs:
                top = torch.topk(logp, min(params.logprobs, logp.shape[-1]))
                entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            req.logprobs.append(entry)
        return token

    def _check_stop(self, req: Request, token: int) -> None:
        early = len(req.output_ids) < req.params.min_tokens
        if token in req.stop_ids and not early:
            req.finish_reason = "stop"
            return
        if req.params.stop and self.tokenizer is not None and not early:
            text = self.tokenizer.decode(req.output_ids)
            hits = [(text.find(s), s) for s in req.params.stop if s in text]
            if hits:
                at, first = min(hits)
                req.text = text[: at + len(first)] if req.params.include_stop_str_in_output else text[:at]
                req.stop_text_hit = True
                req.finish_reason = "stop"
                return
        if len(req.output_ids) >= req.params.max_tokens:
            req.finish_reason = "length"
        elif req.num_tokens >= self.config.max_position_embeddings and not self._extends_context(req.kv.spec):
            req.finish_reason = "context"

    def _group_output(self, group: list[Request]) -> RequestOutput:
        """One prompt's ``RequestOutput`` from its ``n`` requests."""
        outs = [self._output(r) for r in group]
        first = outs[0]
        comps = [CompletionOutput(i, o.text, o.token_ids, o.stats.finish_reason, o.stats, r.logprobs,
                                  sum(lp[t] for lp, t in zip(r.logprobs, r.output_ids, strict=False))
                                  if r.logprobs is not None else None)
                 for i, (o, r) in enumerate(zip(outs, group, strict=True))]
        first.request_id = str(group[0].request_id)
        first.prompt_token_ids = list(group[0].prompt_ids)
        first.outputs = comps
        first.prompt_logprobs = group[0].prompt_logprobs
        return first

    def _output(self, req: Request) -> RequestOutput:
        ids = req.output_ids
        if (req.finish_reason == "stop" and ids and ids[-1] in req.stop_ids
                and not req.params.include_stop_str_in_output):
            ids = ids[:-1]
        if req.stop_text_hit:
            text = req.text
        else:
            text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        first = req.first_token_time or req.start_time
        end = req.finish_time or first
        stats = RequestStats(
            prompt_tokens=req.num_prompt_tokens,
            generated_tokens=len(req.output_ids),
            kv_bytes_held=req.kv.stats.final_bytes,
            kv_bytes_after_prefill=req.kv.stats.prefill_bytes,
            kv_bytes_peak=req.kv.stats.peak_bytes,
            kv_bytes_full=kv_bytes_for_tokens(self.config, req.num_tokens, self.pool.k.element_size()),
            time_to_first_token=first - req.start_time,
            time_per_output_token=(end - first) / max(len(req.output_ids) - 1, 1),
            finish_reason=req.finish_reason or "",
            kv=req.kv.stats,
        )
        return RequestOutput(req.prompt, text, ids, str(req.kv.spec), stats)

    # ---- scoring -----------------------------------------------------------------------------
    @torch.inference_mode()
    def stream_logprobs(self, sequences: Sequence[list[int]], kv: str | KVSpec | Sequence[str | KVSpec] = "full",
                        prefill_tokens: int = 1, progress: bool = False) -> list[Tensor]:
        """Teacher-forced log-probabilities, token by token, with the KV method active while decoding.

        For each sequence, the first ``prefill_tokens`` tokens are prefilled; then every following token
        is fed as a decode step (eviction happens as in generation). Returns, per sequence, a fp32 tensor
        of log p(token[t] | tokens[:t]) for t = prefill_tokens .. len - 1.
        """
        specs = [KVSpec.parse(s) for s in _per_prompt(kv, len(sequences), "kv")]
        reqs, targets = [], []
        for seq, spec in zip(sequences, specs, strict=True):
            if not 1 <= prefill_tokens < len(seq):
                raise LongctxError(f"need 1 <= prefill_tokens < sequence length, got {prefill_tokens} and {len(seq)}")
            params = SamplingParams(max_tokens=len(seq) - prefill_tokens, ignore_eos=True)
            reqs.append(self._make_request(list(seq[:prefill_tokens]), params, spec, chat=False))
            self._check_length(list(seq), spec)
            targets.append(list(seq))
        results: list[list[float]] = [[] for _ in reqs]
        scheduler = Scheduler(self.max_num_seqs)
        for r in reqs:
            scheduler.add(r)
        index = {r.request_id: i for i, r in enumerate(reqs)}
        bar = tqdm(total=sum(len(t) - prefill_tokens for t in targets), desc="scoring", unit="tok",
                   disable=not progress)
        try:
            while scheduler.has_unfinished:
                scheduled = scheduler.schedule()
                logits = self.runner.run(scheduled)
                for (req, _), row in zip(scheduled, logits, strict=True):
                    if req.is_prefill:
                        continue
                    i = index[req.request_id]
                    target = targets[i][req.num_tokens]
                    results[i].append(float(torch.log_softmax(row.float(), dim=-1)[target]))
                    req.output_ids.append(target)
                    bar.update(1)
                    if req.num_tokens == len(targets[i]):
                        req.finish_reason = "length"
                        scheduler.finish(req)
        finally:
            bar.close()
            for r in scheduler.running:
                r.kv.release()
        return [torch.tensor(r, dtype=torch.float32) for r in results]

    @torch.inference_mode()
    def prompt_logits(self, prompt: Prompt, kv: str | KVSpec = "full") -> Tensor:
        """Logits [num_prompt_tokens, vocab] (fp32) for every prompt position, under ``kv``
        (prefill chunks and eviction between them apply as in generation)."""
        spec = KVSpec.parse(kv)
        req = self._make_request(prompt, SamplingParams(max_tokens=1), spec, chat=False)
        out = []
        try:
            while req.is_prefill:
                n = min(req.kv.chunk_size or req.num_prompt_tokens, req.num_prompt_tokens - req.num_computed_tokens)
                out.append(self.runner.run([(req, n)], all_logits=True))
        finally:
            req.kv.release()
        return torch.cat(out)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _per_prompt(value, n: int, name: str) -> list:  # noqa: ANN001
    if isinstance(value, (str, KVSpec, SamplingParams)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise LongctxError(f"{name}: got {len(values)} values for {n} prompts")
    return values
