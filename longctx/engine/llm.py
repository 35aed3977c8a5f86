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

from longctx.engine.llm_engine import LLMEngine
from longctx.engine.request import CompletionOutput, Request, RequestOutput
from longctx.engine.runner import ModelRunner
from longctx.engine.sampling import SamplingParams
from longctx.errors import LongctxError, PromptTooLongError
from longctx.heads.binding import bind_model
from longctx.kv.pool import BlockPool
from longctx.kv.spec import KVSpec
from longctx.model.loader import LoadedModel, load_model

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]
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
                 block_size: int = 16, max_kv_bytes: int | None = None, max_num_seqs: int = 64,
                 preallocate_kv: bool = False, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 8192,
                 max_waiting: int | None = None) -> None:
        """``model`` may also be an already built :class:`LoadedModel` (e.g. random weights for benchmarks;
        its tokenizer may then be None and prompts must be token ids).

        The KV pool's capacity is fixed here, once: ``max_kv_bytes`` if given; otherwise on a GPU
        ``gpu_memory_utilization`` of the device's memory less what the weights and a measured activation
        peak (one step of ``max_num_batched_tokens`` tokens) take, and on the CPU 8 GiB. The pool's
        tensors grow on demand within that capacity unless ``preallocate_kv`` allocates it all up front
        (CUDA-graph replays never need re-capturing then)."""
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_kv_bytes", 1 if max_kv_bytes is None else max_kv_bytes),
                            ("max_model_len", 1 if max_model_len is None else max_model_len),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LongctxError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1):
            raise LongctxError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
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
        profile = max_kv_bytes is None and self.device.type == "cuda"
        if max_kv_bytes is None:  # on a GPU: a pool just big enough for the profiling step, resized below
            max_kv_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * (max_num_batched_tokens + 2 * block_size)
                            * bytes_per_block) // 2 if profile else 8 << 30
        max_blocks = max_kv_bytes // bytes_per_block
        if max_blocks < 2:
            raise LongctxError(f"max_kv_bytes={max_kv_bytes} is below two KV blocks ({2 * bytes_per_block} bytes)")
        self.pool = BlockPool(cfg.head_dim, block_size=block_size,
                              num_blocks=max_blocks if preallocate_kv and not profile else min(256, max_blocks),
                              max_blocks=max_blocks, dtype=self.dtype, device=self.device)
        self.runner = ModelRunner(self.model, self.device)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.allow_head_scoring = True  # budget=duo(heads=auto) may calibrate on first use (the server turns it off)
        self.engine = LLMEngine(self, max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting)
        bind_model(self)  # head-score budgets (duo, razor, headkv) check their files against this model
        if profile:
            self._size_pool_from_free_memory(gpu_memory_utilization, max_num_batched_tokens, preallocate_kv)

    @torch.inference_mode()
    def _size_pool_from_free_memory(self, utilization: float, num_tokens: int, preallocate: bool) -> None:
        """Measure the activation peak of one full step, then give the KV pool what is left of
        ``utilization`` x the device's memory."""
        num_tokens = min(num_tokens, self.max_model_len)
        ids = [i % self.config.vocab_size for i in range(num_tokens)]
        req = self.engine.make_request(ids, SamplingParams(max_tokens=1), KVSpec.parse("full"))
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            assert self.engine.kv.allocate_slots(req, num_tokens)
            kv_bytes = torch.cuda.memory_allocated(self.device) - base
            self.runner.run([(req, num_tokens)])
            torch.cuda.synchronize(self.device)
            activations = torch.cuda.max_memory_allocated(self.device) - base - kv_bytes
        finally:
            req.kv.release()
        _, total = torch.cuda.mem_get_info(self.device)
        weights = base - self.pool.num_blocks * self.pool.bytes_per_block
        budget = int(utilization * total) - weights - activations - (256 << 20)  # + headroom for the CUDA context
        blocks = budget // self.pool.bytes_per_block
        if blocks < 2:
            raise LongctxError(f"no GPU memory left for the KV cache: weights take {weights / 2**30:.1f} GiB and "
                               f"a step of {num_tokens} tokens {activations / 2**30:.1f} GiB of "
                               f"{utilization:.0%} x {total / 2**30:.1f} GiB; lower max_num_batched_tokens or "
                               f"pass max_kv_bytes")
        self.pool.max_blocks = max(blocks, self.pool.num_blocks)
        self.kv_profile = {"weights_bytes": weights, "activation_bytes": activations, "kv_bytes": blocks
                           * self.pool.bytes_per_block}
        if preallocate and self.pool.max_blocks > self.pool.num_blocks:
            self.pool._grow(self.pool.max_blocks - self.pool.num_blocks)

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

    def check_length(self, ids: list[int], spec: KVSpec) -> None:
        """Raise PromptTooLongError if ``ids`` exceed the context (unless ``spec`` extends it)."""
        limit = self.max_model_len
        if len(ids) > limit and not self.extends_context(spec):
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens but the context is {limit} (max_model_len); shorten it or use a "
                f"positions method that extends the context (e.g. --kv 'positions=self_extend(group=4,window=1024)'); "
                f"set LONGCTX_ALLOW_BEYOND_CONTEXT=1 to run plain RoPE past it anyway"
            )

    def extends_context(self, spec: KVSpec) -> bool:
        """Whether positions beyond the trained context are allowed for ``spec`` on this model (always, when
        the environment sets LONGCTX_ALLOW_BEYOND_CONTEXT=1, e.g. to measure plain RoPE past its range)."""
        if os.environ.get("LONGCTX_ALLOW_BEYOND_CONTEXT") == "1":
            return True
        return spec.positions.name in EXTENDING_POSITIONS or self.config.rope.rope_type in ("dynamic", "yarn")

    def _make_request(self, prompt: Prompt, params: SamplingParams, spec: KVSpec, chat: bool,
                      ids: list[int] | None = None, index: int = 0) -> Request:
        """A request for ``prompt`` (already encoded when ``ids`` is given), not yet added to the engine."""
        ids = self.encode(prompt, chat) if ids is None else ids
        return self.engine.make_request(ids, params, spec, prompt=prompt if isinstance(prompt, (str, list)) else ids,
                                        index=index)

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
        is deferred to the end of each prompt, so results equal prefilling every prompt separately, except
        for a query-agnostic policy (``retain=kvzip``): it compresses the shared document once, before any
        question, which is the point of such a policy (each question then reads the same compressed cache)."""
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
        """``generate`` and ``chat``: ``n`` requests per prompt, run to completion by the engine."""
        n = len(encoded)
        params_list = _per_prompt(sampling_params or self.get_default_sampling_params(), n, "sampling_params")
        for sp in params_list:
            if not isinstance(sp, SamplingParams):
                raise LongctxError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        specs = [KVSpec.parse(s) for s in _per_prompt(kv, n, "kv")]
        for (_, ids), spec in zip(encoded, specs, strict=True):
            self.check_length(ids, spec)
        groups = [[self.engine.make_request(ids, sp, spec, prompt=prompt, index=i) for i in range(sp.n)]
                  for (prompt, ids), sp, spec in zip(encoded, params_list, specs, strict=True)]
        bar = tqdm(total=sum(sp.max_tokens * sp.n for sp in params_list), desc="generating", unit="tok",
                   disable=not progress)

        def on_step(reqs: list[Request]) -> None:
            bar.n = sum(r.params.max_tokens if r.is_finished else len(r.output_ids) for r in reqs)
            bar.refresh()

        try:
            self._drive([r for g in groups for r in g], share_prefix, on_step if progress else None)
        finally:
            bar.close()
        return [self._group_output(g) for g in groups]

    def _drive(self, reqs: list[Request], share_prefix: bool = False, on_step=None) -> None:  # noqa: ANN001
        """Add ``reqs`` to the engine and step it until every one of them has finished. Whatever happens
        (an error, an interrupt), none of them is left holding blocks."""
        engine = self.engine
        try:
            engine.add_requests(reqs, share_prefix=share_prefix)
            while not engine.all_finished(reqs):
                stepper = engine.background  # an AsyncLLMEngine steps it: wait instead of taking its outputs
                if stepper is None:
                    engine.step()
                else:
                    stepper.set()
                    time.sleep(0.002)
                if on_step is not None:
                    on_step(reqs)
            failed = [r for r in reqs if r.finish_reason == "error"]
            if failed:
                raise LongctxError(f"request {failed[0].request_id} failed: {failed[0].error}")
        finally:
            for r in reqs:
                if not r.is_finished:
                    engine.abort(r.request_id)
            if any(r.finish_reason == "abort" for r in reqs) and engine.background is None:
                engine.step()  # report (and forget) the aborted requests

    def _group_output(self, group: list[Request]) -> RequestOutput:
        """One prompt's ``RequestOutput`` from its ``n`` requests."""
        outs = [self.engine.output(r) for r in group]
        first = outs[0]
        first.outputs = [CompletionOutput(i, o.text, o.token_ids, o.stats.finish_reason, o.stats, r.logprobs,
                                          o.outputs[0].cumulative_logprob)
                         for i, (o, r) in enumerate(zip(outs, group, strict=True))]
        return first

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
        reqs = []
        for seq, spec in zip(sequences, specs, strict=True):
            if not 1 <= prefill_tokens < len(seq):
                raise LongctxError(f"need 1 <= prefill_tokens < sequence length, got {prefill_tokens} and {len(seq)}")
            self.check_length(list(seq), spec)
            params = SamplingParams(max_tokens=len(seq) - prefill_tokens, ignore_eos=True)
            req = self.engine.make_request(self.encode(list(seq[:prefill_tokens])), params, spec)
            req.forced_ids, req.scored_logprobs = list(seq[prefill_tokens:]), []
            reqs.append(req)
        bar = tqdm(total=sum(len(r.forced_ids or ()) for r in reqs), desc="scoring", unit="tok",
                   disable=not progress)

        def on_step(rs: list[Request]) -> None:
            bar.n = sum(len(r.output_ids) for r in rs)
            bar.refresh()

        try:
            self._drive(reqs, on_step=on_step if progress else None)
        finally:
            bar.close()
        return [torch.tensor(r.scored_logprobs, dtype=torch.float32) for r in reqs]

    @torch.inference_mode()
    def prompt_logits(self, prompt: Prompt, kv: str | KVSpec = "full") -> Tensor:
        """Logits [num_prompt_tokens, vocab] (fp32) for every prompt position, under ``kv``
        (prefill chunks and eviction between them apply as in generation)."""
        spec = KVSpec.parse(kv)
        req = self.engine.make_request(self.encode(prompt), SamplingParams(max_tokens=1), spec)
        req.prefill_only, req.prompt_logits = True, []
        self._drive([req])
        return torch.cat(req.prompt_logits)


def _per_prompt(value, n: int, name: str) -> list:  # noqa: ANN001
    if isinstance(value, (str, KVSpec, SamplingParams)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise LongctxError(f"{name}: got {len(values)} values for {n} prompts")
    return values
