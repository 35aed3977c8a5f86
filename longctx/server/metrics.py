"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand (no dependency).

Counters are updated on the event loop (single-threaded, no locks); engine gauges (running, waiting,
preemptions, KV blocks) are read from :meth:`LLMEngine.stats` when ``/metrics`` is scraped. Histograms of
time to first token, time per output token and end-to-end latency are kept per KV spec (the canonical spec
text is the ``kv`` label; past :data:`MAX_SPEC_LABELS` distinct specs, new ones share the label ``other``,
so clients cannot grow the label set without bound).

HTTP requests are counted by :class:`MetricsMiddleware` by endpoint and status: ``499`` is a client that
left before its response started. Completions (one per choice: a request with ``n=2`` counts two) are
counted by finish reason, ``abort`` being a client that left mid-stream.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

MAX_SPEC_LABELS = 32
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                                                   strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {_num(self.sum)}" if labels else f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}" if labels else f"{name}_count {self.count}")
        return out


class Metrics:
    """Everything ``/metrics`` reports. ``observe_*`` are called by the server as requests progress."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.http_requests: Counter[tuple[str, str]] = Counter()
        self.in_flight = 0
        self.completions: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft: dict[str, Histogram] = {}
        self.tpot: dict[str, Histogram] = {}
        self.e2e: dict[str, Histogram] = {}
        self.started = time.time()

    def spec_label(self, spec: str) -> str:
        if spec in self.ttft or len(self.ttft) < MAX_SPEC_LABELS:
            return spec
        return "other"

    def observe_http(self, endpoint: str, status: int) -> None:
        self.http_requests[(endpoint if endpoint in ENDPOINTS else "other", str(status))] += 1

    def observe_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens

    def observe_finished(self, spec: str, finish_reason: str, generated_tokens: int, ttft: float | None,
                         tpot: float | None, e2e: float) -> None:
        """One completion ended (any reason); timings are left out where no token was generated."""
        self.completions[finish_reason] += 1
        self.generation_tokens += generated_tokens
        label = self.spec_label(spec)
        if label not in self.ttft:
            self.ttft[label] = Histogram(LATENCY_BUCKETS)
            self.tpot[label] = Histogram(TOKEN_TIME_BUCKETS)
            self.e2e[label] = Histogram(LATENCY_BUCKETS)
        if ttft is not None:
            self.ttft[label].observe(ttft)
        if tpot is not None:
            self.tpot[label].observe(tpot)
        self.e2e[label].observe(e2e)

    def render(self, engine: Any, step_errors: int = 0) -> str:
        """The exposition text; ``engine`` is an :class:`~longctx.engine.llm_engine.EngineStats`."""
        model = f'model="{_escape(self.model_name)}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{{{labels}}} {_num(value)}")

        metric("longctx_http_requests_total", "counter", "HTTP requests answered, by endpoint and status "
               "(499: the client left before the response started).",
               [(f'{model},endpoint="{e}",status="{s}"', n) for (e, s), n in sorted(self.http_requests.items())])
        metric("longctx_http_requests_in_flight", "gauge", "HTTP requests being answered now.",
               [(model, self.in_flight)])
        reasons = sorted(set(self.completions) | {"stop", "length", "abort", "error"})
        metric("longctx_completions_total", "counter", "Completions (one per choice) that ended, by finish reason "
               "(abort: the client left mid-stream).",
               [(f'{model},finish_reason="{r}"', self.completions[r]) for r in reasons])
        metric("longctx_prompt_tokens_total", "counter", "Prompt tokens admitted to the engine (once per choice).",
               [(model, self.prompt_tokens)])
        metric("longctx_generation_tokens_total", "counter", "Tokens generated.", [(model, self.generation_tokens)])
        metric("longctx_requests_running", "gauge", "Engine requests running.", [(model, engine.running)])
        metric("longctx_requests_waiting", "gauge", "Engine requests waiting to be scheduled.",
               [(model, engine.waiting)])
        metric("longctx_preemptions_total", "counter", "Engine requests preempted so far.",
               [(model, engine.preempted)])
        metric("longctx_kv_blocks_used", "gauge", "KV cache blocks in use.", [(model, engine.blocks_used)])
        metric("longctx_kv_blocks_free", "gauge", "KV cache blocks free.", [(model, engine.blocks_free)])
        metric("longctx_kv_blocks_total", "gauge", "KV cache blocks in the pool's capacity.",
               [(model, engine.blocks_total)])
        metric("longctx_kv_bytes_used", "gauge", "KV cache bytes in use.", [(model, engine.kv_bytes_used)])
        metric("longctx_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               [(model, engine.tokens_per_second)])
        metric("longctx_engine_step_errors_total", "counter", "Engine steps that raised.", [(model, step_errors)])
        for name, table, help_text in (
            ("longctx_time_to_first_token_seconds", self.ttft, "Time to first token, per KV spec."),
            ("longctx_time_per_output_token_seconds", self.tpot, "Time per output token after the first, per KV spec."),
            ("longctx_e2e_request_latency_seconds", self.e2e, "Engine time from arrival to the end, per KV spec."),
        ):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} histogram")
            for spec, hist in sorted(table.items()):
                out.extend(hist.lines(name, f'{model},kv="{_escape(spec)}"'))
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and final status, and the requests in flight."""

    def __init__(self, app, metrics: Metrics) -> None:  # noqa: ANN001
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 499  # no response started: the client went away first
        started = False

        async def sending(message) -> None:  # noqa: ANN001
            nonlocal status, started
            if message["type"] == "http.response.start" and not started:
                status, started = message["status"], True
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, sending)
        except Exception:
            if not started:
                status = 500
            raise
        finally:
            self.metrics.in_flight -= 1
            self.metrics.observe_http(scope["path"], status)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
