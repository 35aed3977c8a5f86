"""Scheduling: which requests run in the next step, how many tokens each feeds, who is preempted.

There are no separate prefill and decode phases: a step packs, within a token
budget (``max_num_batched_tokens``), first one token for every running request
that decodes, then prefill chunks of running requests still in their prompt,
then chunks of waiting requests in arrival order (FCFS: the head of the queue
is never overtaken, so a long prompt cannot starve behind short ones). Every
prompt is chunked; where a KV method evicts only at the end of its prompt (dense
prefill) or of each of its chunks (``chunked(size=N)``), eviction is deferred
over the pieces in between, so what a method keeps does not depend on how the
scheduler cut its prompt.

Memory comes first (:class:`~longctx.engine.kv_cache_manager.KVCacheManager`):
every scheduled token is reserved before the step; when a running request cannot
get its room, the most recently admitted running request is preempted (its
blocks freed, requeued at the front) until it can. A preempted request is
recomputed later from its prompt; a request whose KV method keeps state beyond
the tokens (eviction, quantization) replays its generated tokens one decode
step at a time, so it ends exactly where it was.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from longctx.engine.kv_cache_manager import KVCacheManager
from longctx.engine.request import Request
from longctx.errors import QueueFullError
from longctx.kv.sequence import SequenceKV


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    forked: list[Request] = field(default_factory=list)  # shared-prefix requests that continued from a copy


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 8192,
                 max_waiting: int | None = None) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        if self.max_waiting is not None and not req.pending_children and self.num_queued >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        self.waiting.append(req)

    @property
    def num_queued(self) -> int:
        """Waiting requests, the internal shared prefixes not counted (what ``max_waiting`` bounds)."""
        return sum(not r.pending_children for r in self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[Request, int] = {}
        budget = self.max_num_batched_tokens
        gone: set[int] = set()  # ids of requests preempted during this step
        for prefilling in (False, True):  # decode tokens first, then the prompt chunks of running requests
            for req in list(self.running):
                if budget == 0:
                    break
                if req.is_prefill != prefilling or req in scheduled or id(req) in gone:
                    continue
                n = self._num_new_tokens(req, budget)
                self._set_deferral(req, n)
                while not self.kv.allocate_slots(req, n):
                    victim = self.running[-1]
                    self.preempt(victim)
                    gone.add(id(victim))
                    out.preempted.append(victim)
                    budget += scheduled.pop(victim, 0)
                    if victim is req:
                        break
                else:
                    scheduled[req] = n
                    budget -= n
        if not out.preempted and self.waiting:  # after a preemption memory is short: admit nobody this step
            self._admit(scheduled, budget, out)
        out.scheduled = list(scheduled.items())
        now = time.perf_counter()
        for r, _ in out.scheduled:
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
        return out

    def _admit(self, scheduled: dict[Request, int], budget: int, out: SchedulerOutput) -> None:
        committed = self.kv.committed_blocks(self.running)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            parent = req.parent
            if parent is not None and parent.is_prefill:
                break  # its shared prefix is still being computed (it runs ahead of it)
            n = self._num_new_tokens(req, budget, after_fork=parent)
            if not self._fits(req, n, committed, parent):
                break
            if parent is not None:
                self._fork(req, parent)
                out.forked.append(req)
            self._set_deferral(req, n)
            if not self.kv.allocate_slots(req, n):
                self.waiting.popleft()
                self.running.append(req)
                self.preempt(req)  # the estimate was short (quantized growth): undo, retry next step
                out.preempted.append(req)
                break
            self.waiting.popleft()
            self.running.append(req)
            scheduled[req] = n
            budget -= n
            committed += max(0, self.kv.admitted_blocks(req) - self.kv.held_blocks(req))

    def _fits(self, req: Request, n: int, committed: int, parent: Request | None) -> bool:
        if parent is None:
            return self.kv.can_admit(req, n, committed)
        free = self.kv.free_blocks - committed
        rows = parent.kv.rows
        need = rows.num_blocks + rows.blocks_needed(n)
        if self.kv.is_bounded(req):
            need = max(need, self.kv.peak_blocks(req))
        return need <= free

    def _fork(self, req: Request, parent: Request) -> None:
        req.kv.fork_from(parent.kv)
        req.num_computed_tokens = parent.num_prompt_tokens
        req.parent = None
        self.drop_child(parent)

    def drop_child(self, parent: Request) -> None:
        """One request no longer needs the shared prefix ``parent``; the last one frees it."""
        parent.pending_children -= 1
        if parent.pending_children <= 0:
            if parent in self.running:
                self.running.remove(parent)
            if parent in self.waiting:
                self.waiting.remove(parent)
            parent.kv.release()

    def _num_new_tokens(self, req: Request, budget: int, after_fork: Request | None = None) -> int:
        if not req.is_prefill:
            return 1  # a decode step (or one replayed token of a recomputed request)
        computed = after_fork.num_prompt_tokens if after_fork is not None else req.num_computed_tokens
        n = req.prefill_target - computed
        chunk = req.kv.chunk_size
        if chunk and computed < req.num_prompt_tokens:
            n = min(n, chunk - computed % chunk, req.num_prompt_tokens - computed)
        return min(n, budget)

    @staticmethod
    def _set_deferral(req: Request, n: int) -> None:
        """Evict only where the method would without the scheduler's cuts: at the end of the prompt or of
        one of its own chunks (a shared prefix never evicts: its copies evict at their own prompt's end; a
        query-agnostic reconstruction policy such as kvzip compresses the shared prefix once instead)."""
        if req.prefill_only and req.pending_children and not req.kv.retain.needs_reconstruction:
            req.kv.defer_eviction = True  # (a query-agnostic reconstruction policy compresses it once instead)
            return
        if not req.is_prefill:
            req.kv.defer_eviction = False
            return
        end = req.num_computed_tokens + n
        chunk = req.kv.chunk_size
        req.kv.defer_eviction = not (end >= req.num_prompt_tokens or (chunk and end % chunk == 0))

    # ---- leaving ----------------------------------------------------------------------------------
    def preempt(self, req: Request) -> None:
        """Free the request's blocks and requeue it at the front, to be recomputed from its prompt."""
        self.running.remove(req)
        old = req.kv
        old.release()
        req.kv = SequenceKV(old.rows.pool, old.cfg, old.spec, req.num_prompt_tokens)
        req.kv.stats = old.stats  # accounting carries over (peak, evictions)
        req.num_computed_tokens = 0
        # A method with no state beyond the tokens recomputes prompt + output in one pass; the others replay
        # their output one decode step at a time, exactly as it was produced.
        stateless = req.kv.layer_budgets is None and req.kv.rows.quant is None and not req.prefill_only
        req.prefill_target = req.num_tokens if stateless and req.output_ids else req.num_prompt_tokens
        if req.prompt_logits is not None:
            req.prompt_logits.clear()  # recomputed from the start
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """A finished request leaves the batch and frees its blocks (a shared prefix stays until copied)."""
        if req in self.running:
            self.running.remove(req)
        if req.prefill_only and req.pending_children > 0:
            return
        req.kv.snapshot(final=True)
        req.kv.release()

    def remove(self, req: Request) -> None:
        """Take an unfinished request out (abort): from the queue or the batch, its blocks freed."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req.parent is not None:
            parent, req.parent = req.parent, None
            self.drop_child(parent)
        req.kv.snapshot(final=True)
        req.kv.release()
