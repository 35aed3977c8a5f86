"""Scheduling: which requests run in the next step and how many tokens each feeds.

There are no separate prefill and decode phases: each running request feeds
``num_tokens - num_computed_tokens`` tokens (capped by its prefill chunk size),
so a request in prefill and requests decoding share one packed forward pass.
"""

from __future__ import annotations

from collections import deque

from longctx.engine.request import Request


class Scheduler:
    def __init__(self, max_num_seqs: int = 64, max_prefill_tokens: int = 8192) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        """Admit waiting requests up to ``max_num_seqs`` and give each running request its tokens."""
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        scheduled: list[tuple[Request, int]] = []
        prefill_tokens = 0
        for req in self.running:
            n = req.num_tokens - req.num_computed_tokens
            if req.is_prefill:
                chunk = req.kv.chunk_size or n
                n = min(n, chunk)
                if scheduled and prefill_tokens + n > self.max_prefill_tokens:
                    continue  # this prompt waits for a lighter step
                prefill_tokens += n
            scheduled.append((req, n))
        return scheduled

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        req.kv.snapshot(final=True)
        req.kv.release()
