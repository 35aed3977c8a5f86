"""``LLMEngine``: the one engine loop. Requests are added at any time; each :meth:`LLMEngine.step` schedules,
reserves KV blocks, runs one packed forward pass and turns its logits into tokens and outputs.

Every front end drives this loop: ``LLM.generate`` / ``chat`` / ``stream_logprobs`` / ``prompt_logits``,
the eval harness and the benchmarks through them, and ``AsyncLLMEngine`` (the server) from its own thread.

    >>> engine = LLMEngine(LLM("model.gguf"))       # or LLMEngine.from_model(path)
    >>> rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=16), kv="snapkv:1024")
    >>> while engine.has_unfinished_requests():
    ...     for out in engine.step():
    ...         print(out.outputs[0].text_delta, end="")

Submission (:meth:`add_request`, :meth:`abort`) is thread-safe: it takes the same lock as a step.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from longctx.engine.detokenizer import IncrementalDetokenizer
from longctx.engine.kv_cache_manager import KVCacheManager
from longctx.engine.request import CompletionOutput, Request, RequestOutput, RequestStats
from longctx.engine.sampler import sample_batch
from longctx.engine.sampling import SamplingParams
from longctx.engine.scheduler import Scheduler
from longctx.errors import LongctxError, QueueFullError, RequestTooLargeError
from longctx.kv.retain.kvzip import compress_after_step
from longctx.kv.sequence import SequenceKV, kv_bytes_for_tokens
from longctx.kv.spec import KVSpec
from longctx.units import human_bytes

if TYPE_CHECKING:
    from longctx.engine.llm import LLM

MIN_SHARED_PREFIX = 128  # tokens; shorter common prefixes are cheaper to recompute than to copy


@dataclass
class EngineStats:
    running: int
    waiting: int
    preempted: int  # preemptions so far
    blocks_used: int
    blocks_free: int
    blocks_total: int
    tokens_per_second: float  # generated tokens per second over the last few seconds
    kv_bytes_used: int
    steps: int


class LLMEngine:
    """A persistent engine over one loaded model (an :class:`~longctx.engine.llm.LLM`'s model, pool and
    runner). ``max_num_batched_tokens`` caps the tokens of one step; ``max_waiting`` bounds the queue
    (``add_request`` raises :class:`~longctx.errors.QueueFullError` beyond it)."""

    def __init__(self, llm: LLM, max_num_batched_tokens: int = 8192, max_waiting: int | None = None) -> None:
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_waiting", 1 if max_waiting is None else max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LongctxError(f"{name} must be a positive integer, got {value!r}")
        self.llm = llm
        self.config, self.tokenizer, self.pool, self.runner = llm.config, llm.tokenizer, llm.pool, llm.runner
        self.kv = KVCacheManager(self.pool, self.config, max_num_batched_tokens)
        self.scheduler = Scheduler(self.kv, llm.max_num_seqs, max_num_batched_tokens, max_waiting)
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._stream: set[str] = set()
        self._done_outside: list[Request] = []
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._recent: deque[tuple[float, int]] = deque()
        self.num_steps = 0
        # Set by an AsyncLLMEngine stepping this engine on its thread (its wake-up event): LLM.generate then
        # waits for its requests instead of stepping (which would take the streams' outputs).
        self.background: threading.Event | None = None

    # ---- submission -------------------------------------------------------------------------------
    def make_request(self, ids: list[int], params: SamplingParams, spec: KVSpec, prompt: str | list[int] | None = None,
                     request_id: str | None = None, index: int = 0) -> Request:
        """A request for token ids ``ids`` (not yet added); ``index`` is the completion's number among its
        prompt's ``n`` (it offsets the seed)."""
        self.llm.check_length(ids, spec)
        vocab = self.config.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise LongctxError(f"stop_token_ids out of range [0, {vocab}): {bad[:5]}")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.stop_ids if self.tokenizer is not None else ())
        gen = None
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(params.seed + index if params.seed is not None
                            else int.from_bytes(os.urandom(8), "little") >> 1)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return Request(rid, prompt if prompt is not None else ids, ids, params,
                       SequenceKV(self.pool, self.config, spec, len(ids)), frozenset(stop_ids), generator=gen,
                       logprobs=[] if params.logprobs is not None else None,
                       prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def add_request(self, prompt: str | list[int] | dict[str, Any], params: SamplingParams | None = None,
                    kv: str | KVSpec = "full", request_id: str | None = None, *, chat: bool = False,
                    stream: bool = True) -> str:
        """Queue one completion; returns its request id. ``stream`` makes :meth:`step` report it every step
        (with the new tokens and text); otherwise only when it finishes."""
        params = params if params is not None else self.llm.get_default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise LongctxError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise LongctxError(f"add_request runs one completion: add n={params.n} requests (seeds seed + i) instead")
        ids = self.llm.encode(prompt, chat)
        shown = prompt if isinstance(prompt, (str, list)) else ids
        req = self.make_request(ids, params, KVSpec.parse(kv), prompt=shown, request_id=request_id)
        self.add_requests([req], share_prefix=False, stream=stream)
        return req.request_id

    def add_requests(self, reqs: list[Request], share_prefix: bool = True, stream: bool = False) -> None:
        """Queue built requests. With ``share_prefix``, requests of one KV spec whose prompts share a long
        prefix wait for one copy of it to be computed and continue from copies (eviction is deferred to each
        prompt's end, so results equal computing every prompt separately)."""
        with self._lock:
            for r in reqs:
                if r.request_id in self.requests:
                    raise LongctxError(f"request id {r.request_id!r} is already in use")
                self._check_fits(r)
            order = self._with_shared_prefixes(reqs) if share_prefix else reqs
            bound, queued = self.scheduler.max_waiting, self.scheduler.num_queued
            if bound is not None and queued + sum(not r.pending_children for r in order) > bound:
                raise QueueFullError(f"the waiting queue is full ({queued} of {bound} requests waiting); retry later")
            for r in order:
                self.scheduler.add(r)
                if not r.pending_children:  # a shared prefix is internal: it leaves with its last user
                    self.requests[r.request_id] = r
                if stream:
                    self._stream.add(r.request_id)
                if self.tokenizer is not None and not r.prefill_only:
                    self._detok[r.request_id] = IncrementalDetokenizer(self.tokenizer)

    def _check_fits(self, req: Request) -> None:
        need, have = self.kv.peak_blocks(req), self.kv.capacity_blocks
        if need > have:
            bpb = self.pool.bytes_per_block
            raise RequestTooLargeError(
                f"request needs up to {human_bytes(need * bpb)} of KV ({req.num_prompt_tokens} prompt + "
                f"{req.params.max_tokens} new tokens under '{req.kv.spec}') but the pool holds "
                f"{human_bytes(have * bpb)}; raise --kv-memory, lower max_tokens or use a compressing KV spec")

    def _with_shared_prefixes(self, reqs: list[Request], min_shared: int = MIN_SHARED_PREFIX) -> list[Request]:
        groups: list[tuple[int, list[Request]]] = []  # (shared prefix length, members)
        for req in reqs:
            if not req.kv.can_fork or req.prompt_logprobs is not None or req.prompt_logits is not None:
                groups.append((0, [req]))  # its prompt positions must be computed
                continue
            for i, (shared, members) in enumerate(groups):
                head = members[0]
                if shared == 0 or head.kv.spec != req.kv.spec:
                    continue
                lcp = _common_prefix(head.prompt_ids, req.prompt_ids, shared)
                if lcp >= min_shared:
                    groups[i] = (lcp, [*members, req])
                    break
            else:
                groups.append((len(req.prompt_ids), [req]))
        order: list[Request] = []
        for shared, members in groups:
            if len(members) > 1:
                shared = min(shared, *(len(m.prompt_ids) - 1 for m in members))
            if len(members) < 2 or shared < min_shared:
                order.extend(members)
                continue
            head = members[0]
            ids = head.prompt_ids[:shared]
            base = Request(f"{head.request_id}/prefix", ids, ids, SamplingParams(max_tokens=1),
                           SequenceKV(self.pool, self.config, head.kv.spec, shared), frozenset(),
                           prefill_only=True, pending_children=len(members))
            for m in members:
                m.parent = base
            order.extend([base, *members])
        return order

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is (queued, prefilling, decoding); its blocks are freed at once and the
        next :meth:`step` reports it with finish_reason ``abort``. False if no such unfinished request."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.is_finished:
                return False
            self.scheduler.remove(req)
            req.finish_reason = "abort"
            req.finish_time = time.perf_counter()
            self._done_outside.append(req)
            return True

    def all_finished(self, reqs: list[Request]) -> bool:
        """Whether every one of ``reqs`` has finished (checked between steps: a finished request's accounting
        is complete)."""
        with self._lock:
            return all(r.is_finished for r in reqs)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished or bool(self._done_outside)

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the requests that produced tokens or finished in it (streamed
        requests every step, the others when they finish). Finished requests are forgotten by the engine."""
        with self._lock:
            touched: list[Request] = list(self._done_outside)
            self._done_outside.clear()
            out = self.scheduler.schedule()
            if not out.scheduled:
                touched.extend(self._unschedulable())
                return self._outputs(touched)
            self.num_steps += 1
            try:
                was_prefill = [req.is_prefill for req, _ in out.scheduled]
                logits = self._forward(out.scheduled)
                compress_after_step(self.runner.model, self.tokenizer, out.scheduled, was_prefill)  # KVzip
                touched.extend(self._advance(out.scheduled, logits))
            except BaseException as e:  # the step's requests end with the error; the engine stays usable
                failed = set()
                for req, _ in out.scheduled:
                    self._fail(req, f"{type(e).__name__}: {e}")
                    failed.add(id(req))
                # reported by the next step: the failed requests and whatever this step had to report
                self._done_outside.extend(r for r in touched if id(r) not in failed)
                self._done_outside.extend(req for req, _ in out.scheduled if req.finish_reason == "error")
                raise
            return self._outputs(touched)

    def _forward(self, scheduled: list[tuple[Request, int]]) -> Tensor:
        wants_all = any((r.prompt_logprobs is not None or r.prompt_logits is not None) and r.is_prefill
                        for r, _ in scheduled)
        if not wants_all:
            return self.runner.run(scheduled)
        starts = [r.num_computed_tokens for r, _ in scheduled]
        every = self.runner.run(scheduled, all_logits=True)
        last, offset = [], 0
        for (req, n), start in zip(scheduled, starts, strict=True):
            rows = every[offset : offset + n]
            offset += n
            last.append(rows[-1])
            if start < req.num_prompt_tokens:
                if req.prompt_logits is not None:
                    req.prompt_logits.append(rows[: req.num_prompt_tokens - start].float())
                if req.prompt_logprobs is not None:
                    _record_prompt_logprobs(req, rows, start, n)
        return torch.stack(last)

    def _advance(self, scheduled: list[tuple[Request, int]], logits: Tensor) -> list[Request]:
        """Tokens for every request that caught up with its sequence in this step; finished ones leave."""
        due = [(i, req) for i, (req, _) in enumerate(scheduled)
               if req.num_computed_tokens == req.num_tokens or req.prefill_only]
        touched = []
        tokens: list[int | None] = [None] * len(due)
        forced = [k for k, (_, req) in enumerate(due) if req.forced_ids is not None and not req.prefill_only]
        sampled = [k for k, (_, req) in enumerate(due) if req.forced_ids is None and not req.prefill_only]
        def rows_of(ks: list[int]) -> Tensor:  # the logits rows of due[ks] (all of them: no gather, no copy)
            idx = [due[k][0] for k in ks]
            return logits if idx == list(range(logits.shape[0])) else logits[torch.tensor(idx, device=logits.device)]

        if forced:
            targets = [due[k][1].forced_ids[len(due[k][1].output_ids)] for k in forced]  # type: ignore[index]
            rows = rows_of(forced).float()
            picked = torch.log_softmax(rows, dim=-1).gather(
                1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
            for k, target, value in zip(forced, targets, picked, strict=True):
                due[k][1].scored_logprobs.append(value)  # type: ignore[union-attr]
                tokens[k] = target
        if sampled:
            for k, token in zip(sampled, self._sample([due[k][1] for k in sampled], rows_of(sampled)), strict=True):
                tokens[k] = token
        # Sampling read the tokens back, so the step's GPU work is done: time stamps come after it.
        now = time.perf_counter()
        for (_, req), token in zip(due, tokens, strict=True):
            if token is None:
                if not req.is_prefill:  # a shared prefix or a scored prompt is complete
                    req.finish_reason = "prefill"
                    req.finish_time = now
                    self.scheduler.finish(req)
                    touched.append(req)
                continue
            if not req.output_ids:
                req.kv.snapshot(final=False)
                req.first_token_time = now
            req.output_ids.append(token)
            self._count(now, 1)
            self._check_stop(req, token)
            if req.is_finished:
                req.finish_time = now
                self.scheduler.finish(req)
            touched.append(req)
        return touched

    def _unschedulable(self) -> list[Request]:
        """Nothing could be scheduled, with nothing running. Computed shared prefixes that hold the room are
        dropped first (their requests then prefill their whole prompt); otherwise that is final for the queue's
        head: it ends with an error instead of waiting forever."""
        if self.scheduler.running or not self.scheduler.waiting:
            return []
        held = [r for r in self.scheduler.waiting if r.parent is not None and r.parent not in self.scheduler.waiting]
        if held:  # computed shared prefixes hold the room: drop them, their requests prefill on their own
            for r in held:
                parent, r.parent = r.parent, None
                self.scheduler.drop_child(parent)
            return []
        if self.pool.release_idle_quant_pools():
            return []  # idle quantized pools gave their bytes back: try again
        req = self.scheduler.waiting[0]
        self._fail(req, f"the KV pool ({self.kv.capacity_blocks} blocks) cannot hold this request now "
                        f"({self.kv.free_blocks} free)")
        return [req]

    def _fail(self, req: Request, message: str) -> None:
        if req.is_finished:
            return
        self.scheduler.remove(req)
        req.finish_reason = "error"
        req.error = message
        req.finish_time = time.perf_counter()

    # ---- sampling and stopping --------------------------------------------------------------------
    def _sample(self, reqs: list[Request], logits: Tensor) -> list[int]:
        """Next tokens of ``reqs`` from their logits rows [R, vocab], with one read of the device (plus one
        per request that asked for log-probabilities)."""
        banned = [r.stop_ids if len(r.output_ids) < r.params.min_tokens else frozenset() for r in reqs]
        tokens = sample_batch(logits, [(r.params, r.generator, r.prompt_ids, r.output_ids, b)
                                       for r, b in zip(reqs, banned, strict=True)])
        for k, (req, token) in enumerate(zip(reqs, tokens, strict=True)):
            if req.logprobs is None:
                continue
            logp = torch.log_softmax(logits[k].float(), dim=-1)
            entry = {token: float(logp[token])}
            if req.params.logprobs:
                top = torch.topk(logp, min(req.params.logprobs, logp.shape[-1]))
                entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            req.logprobs.append(entry)
            req.cumulative_logprob += entry[token]
        return tokens

    def _check_stop(self, req: Request, token: int) -> None:
        if req.forced_ids is not None:
            if len(req.output_ids) >= len(req.forced_ids):
                req.finish_reason = "length"
            return
        early = len(req.output_ids) < req.params.min_tokens
        if token in req.stop_ids and not early:
            req.finish_reason = "stop"
            return
        if req.params.stop and self.tokenizer is not None and not early:
            detok = self._detok.get(req.request_id)
            if detok is not None:  # incremental: a window of new tokens per step, not the whole output again
                detok.push(req.output_ids)
                text = detok.text
            else:
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
        elif req.num_tokens >= self.config.max_position_embeddings and not self.llm.extends_context(req.kv.spec):
            req.finish_reason = "context"

    # ---- outputs ----------------------------------------------------------------------------------
    def _outputs(self, touched: Iterable[Request]) -> list[RequestOutput]:
        outs = []
        for req in touched:
            if req.prefill_only and req.prompt_logits is None:
                continue  # a shared prefix: internal
            if req.is_finished or req.request_id in self._stream:
                outs.append(self.output(req))
            if req.is_finished:
                self.requests.pop(req.request_id, None)
                self._stream.discard(req.request_id)
                self._detok.pop(req.request_id, None)
        return outs

    def final_ids(self, req: Request) -> list[int]:
        ids = req.output_ids
        if (req.finish_reason == "stop" and ids and ids[-1] in req.stop_ids
                and not req.params.include_stop_str_in_output):
            ids = ids[:-1]
        return ids

    def final_text(self, req: Request) -> str:
        if req.stop_text_hit:
            return req.text
        return self.tokenizer.decode(self.final_ids(req)) if self.tokenizer is not None else ""

    def output(self, req: Request) -> RequestOutput:
        """The request's output now: cumulative text and tokens, plus what is new since the last output."""
        finished = req.is_finished
        if finished:
            text, ids = self.final_text(req), self.final_ids(req)
        else:
            detok = self._detok.get(req.request_id)
            text = "" if detok is None else (detok.push(req.output_ids), detok.text)[1]  # no tokenizer: ids only
            if req.params.stop:  # hold back what may turn out to be the start of a stop string
                text = text[: max(len(text) - (max(map(len, req.params.stop)) - 1), 0)]
            ids = req.output_ids
        delta = text[req.emitted_text_len :] if len(text) > req.emitted_text_len else ""
        req.emitted_text_len = max(req.emitted_text_len, len(text))
        new_ids = ids[req.emitted_tokens :]
        req.emitted_tokens = len(ids)
        stats = self.request_stats(req)
        cumulative = req.cumulative_logprob if req.logprobs is not None else None
        comp = CompletionOutput(0, text, list(ids), req.finish_reason or "", stats, req.logprobs, cumulative,
                                new_token_ids=list(new_ids), text_delta=delta)
        return RequestOutput(req.prompt, text, list(ids), req.kv.spec_text, stats, request_id=req.request_id,
                             prompt_token_ids=req.prompt_ids, outputs=[comp],  # shared, not copied per step
                             prompt_logprobs=req.prompt_logprobs, finished=finished, error=req.error)

    def request_stats(self, req: Request) -> RequestStats:
        first = req.first_token_time or req.start_time
        end = req.finish_time or first
        kv = req.kv.stats
        return RequestStats(
            prompt_tokens=req.num_prompt_tokens,
            generated_tokens=len(req.output_ids),
            kv_bytes_held=kv.final_bytes if req.is_finished else req.kv.rows.bytes_held(),
            kv_bytes_after_prefill=kv.prefill_bytes,
            kv_bytes_peak=kv.peak_bytes,
            kv_bytes_full=kv_bytes_for_tokens(self.config, req.num_tokens, self.pool.k.element_size()),
            time_to_first_token=first - req.start_time,
            time_per_output_token=(end - first) / max(len(req.output_ids) - 1, 1),
            finish_reason=req.finish_reason or "",
            kv=kv,
            queue_time=(req.first_scheduled_time or end) - req.start_time,
            num_preemptions=req.num_preemptions,
            kv_bytes_read_per_step=kv.read_bytes_per_step if req.is_finished else None,
        )

    # ---- stats --------------------------------------------------------------------------------------
    def _count(self, now: float, n: int) -> None:
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10.0:
            self._recent.popleft()

    def stats(self) -> EngineStats:
        with self._lock:
            now = time.perf_counter()
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()
            span = now - self._recent[0][0] if self._recent else 0.0
            tps = sum(n for _, n in self._recent) / span if span > 0 else 0.0
            used = self.pool.num_used_blocks + sum(qp.num_used_blocks * qp.bytes_per_block // self.pool.bytes_per_block
                                                   for qp in self.pool.quant_pools.values())
            return EngineStats(
                running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                preempted=self.scheduler.num_preemptions, blocks_used=used,
                blocks_free=self.kv.free_blocks, blocks_total=self.kv.capacity_blocks,
                tokens_per_second=tps, kv_bytes_used=used * self.pool.bytes_per_block, steps=self.num_steps)


def _record_prompt_logprobs(req: Request, rows: Tensor, start: int, n: int) -> None:
    """Log-probabilities of the prompt tokens this chunk predicts (the logits at position p predict p + 1)."""
    assert req.prompt_logprobs is not None
    targets = req.prompt_ids[start + 1 : min(start + n, req.num_prompt_tokens - 1) + 1]
    skip = len(req.prompt_logprobs) - (start + 1)  # positions recorded before a preemption (recomputed now)
    if skip > 0:
        rows, targets = rows[skip:], targets[skip:]
    if not targets:
        return
    logp = torch.log_softmax(rows[: len(targets)].float(), dim=-1)
    picked = logp.gather(1, torch.tensor(targets, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    k = min(req.params.prompt_logprobs or 0, logp.shape[-1])
    top = torch.topk(logp, k) if k else None
    for j, (token, value) in enumerate(zip(targets, picked, strict=True)):
        entry = {token: value}
        if top is not None:
            entry.update(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
        req.prompt_logprobs.append(entry)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
