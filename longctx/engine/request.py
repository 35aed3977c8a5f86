"""A generation request: prompt, sampling parameters, KV state, outputs and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longctx.engine.sampling import SamplingParams
from longctx.kv.sequence import KVStats, SequenceKV


@dataclass
class RequestStats:
    """Per-request numbers reported to the user."""

    prompt_tokens: int
    generated_tokens: int = 0
    kv_bytes_held: int = 0  # at the end of generation (measured from the pool)
    kv_bytes_after_prefill: int = 0
    kv_bytes_peak: int = 0
    kv_bytes_full: int = 0  # what a full cache would hold for prompt + generated tokens
    time_to_first_token: float = 0.0  # seconds
    time_per_output_token: float = 0.0  # seconds, over tokens after the first
    finish_reason: str = ""
    kv: KVStats | None = None
    queue_time: float = 0.0  # seconds from arrival to the first scheduled step
    num_preemptions: int = 0
    # mean bytes of KV (and of the select method's own data) one decode step read; None under select=all,
    # where every step reads every held token
    kv_bytes_read_per_step: float | None = None


@dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's shape): ``index`` among the prompt's ``n`` completions, the
    text and token ids, why it stopped, and with ``SamplingParams.logprobs`` one dict per generated token
    mapping token id -> log-probability (the sampled token plus the k most likely)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    # streaming (``LLMEngine.step``): what this step added
    new_token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns for one prompt: ``outputs`` holds its ``n`` completions; ``text``,
    ``token_ids`` and ``stats`` are those of the first (the single completion when n = 1)."""

    prompt: str | list[int]
    text: str
    token_ids: list[int]
    kv_spec: str
    stats: RequestStats
    request_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = True
    error: str | None = None  # why the engine gave up on the request (finish_reason "error")


@dataclass(eq=False)  # identity: requests are keys of the scheduler's per-step maps
class Request:
    """One sequence the engine runs: prompt, sampling parameters, KV state, outputs, timings and the
    engine's bookkeeping (how far it is computed, what it is waiting for)."""

    request_id: str
    prompt: str | list[int]
    prompt_ids: list[int]
    params: SamplingParams
    kv: SequenceKV
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    stop_text_hit: bool = False
    start_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # engine bookkeeping
    prefill_target: int = -1  # tokens fed as prefill (the prompt; after a preemption maybe more)
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    forced_ids: list[int] | None = None  # teacher forcing: the tokens to feed instead of sampling
    scored_logprobs: list[float] | None = None  # log p(forced token) per forced step
    prompt_logits: list[Tensor] | None = None  # every prompt position's logits, when asked for
    prefill_only: bool = False  # finishes once its prompt is computed (a shared prefix, prompt scoring)
    parent: Request | None = None  # a shared prefix this request forks once it is computed
    pending_children: int = 0  # a shared prefix: requests that have not forked it yet
    error: str | None = None
    emitted_text_len: int = 0  # characters of text already streamed
    emitted_tokens: int = 0  # output tokens already streamed
    cumulative_logprob: float = 0.0  # sum of the sampled tokens' log-probabilities (with SamplingParams.logprobs)

    def __post_init__(self) -> None:
        if self.prefill_target < 0:
            self.prefill_target = len(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building the whole list (a decode step reads one token)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
