"""``longctx bench serve``: a serving workload replayed against the engine in-process, once per KV spec.

The same seeded workload (``num_requests`` prompts of random token ids, lengths drawn uniformly from
``prompt_len``; every request greedy with ``ignore_eos`` so it generates exactly ``output_len`` tokens) is
fed to a fresh :class:`~longctx.engine.llm.LLM` per KV spec, each with the same fixed KV memory
(``kv_memory_gb``). Arrivals are all at once (every request added before the first step) or Poisson at
``rate`` requests/s (each request added at its arrival time while the engine steps). Per spec it measures
requests/s, output tokens/s, TTFT and TPOT percentiles, the sequences running per step (mean and max),
preemptions, peak KV memory, KV bytes per request and, for Poisson arrivals, goodput. Hugging Face
``generate`` in static batches (its best batch size that fits) on the same weights and prompts is the
baseline. Results: a printed table, ``serve.json`` (schema ``longctx.bench.serve/1``) and ``serve.png``.

Compressing KV specs hold fewer bytes per request, so the same KV memory admits more sequences at once:
that is what the concurrency and tokens/s columns show against ``full``.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from longctx.bench.common import cpu_model, machine_info, now_iso
from longctx.bench.sweep import SHAPES, hf_llama, random_model, shape_config
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.errors import LongctxError
from longctx.kv.sequence import kv_bytes_for_tokens
from longctx.kv.spec import KVSpec
from longctx.model.config import ModelConfig
from longctx.model.loader import LoadedModel, load_model
from longctx.safe_io import open_for_write, prepare_output_dir, write_text
from longctx.units import human_bytes

SCHEMA = "longctx.bench.serve/1"
DEFAULT_SPECS = ("full", "snapkv:1024")
SHAPE_ALIASES = {"llama3-8b": "8b", "llama3.2-1b": "1b", "llama3-1b": "1b"}
SHAPE_CHOICES = (*SHAPES, *SHAPE_ALIASES)
HF_CPU_BATCHES = (1, 4, 16)  # on the CPU the baseline tries these batch sizes; on a GPU 1, 2, 4, ... until OOM
WARM_REQUESTS = 4  # every spec first runs this many of the prompts for 2 tokens, untimed (first-call costs)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ServeSettings:
    """What ``longctx bench serve`` runs (the CLI's flags; ``None`` = the device-dependent default)."""

    model: str | None = None  # checkpoint folder or .gguf; None with no shape: SmolLM2 on the CPU, 8b on a GPU
    shape: str | None = None  # random weights of a sweep shape (8b, 1b, tiny; llama3-8b = 8b)
    device: str = "auto"  # cuda when available, else cpu
    dtype: str = "auto"  # fp32 on the CPU, bf16 on a GPU
    specs: list[str] = field(default_factory=lambda: list(DEFAULT_SPECS))
    num_requests: int = 128
    prompt_len: tuple[int, int] = (1024, 4096)  # inclusive; (n, n) for a fixed length
    output_len: int = 128
    arrival: str = "all"  # all | poisson
    rate: float = 4.0  # requests/s, poisson only
    seed: int = 0
    kv_memory_gb: float = 8.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    baseline: str = "hf"  # hf | none
    ttft_slo: float | None = None  # seconds: goodput counts only requests whose TTFT is within it
    warmup: int | None = None  # untimed replays per spec before the measured one (None: 1 on a GPU, 0 on the CPU)
    out: str | None = None
    progress: bool = True

    def resolved(self) -> ServeSettings:
        """A copy with device, dtype, model/shape and warmup defaults filled in, every value checked."""
        s = ServeSettings(**asdict(self))
        s.specs = list(s.specs)
        s.prompt_len = (int(s.prompt_len[0]), int(s.prompt_len[1]))
        if s.device == "auto":
            s.device = "cuda" if torch.cuda.is_available() else "cpu"
        if s.device.startswith("cuda") and not torch.cuda.is_available():
            raise LongctxError("--device cuda: no CUDA GPU available (use --device cpu)")
        if s.dtype == "auto":
            s.dtype = "fp32" if s.device == "cpu" else "bf16"
        if s.dtype not in DTYPES:
            raise LongctxError(f"--dtype: {s.dtype!r} is not one of {', '.join(DTYPES)}")
        if s.model is not None and s.shape is not None:
            raise LongctxError("give --model PATH or --shape NAME, not both")
        if s.shape is not None:
            if s.shape not in SHAPE_CHOICES:
                raise LongctxError(f"--shape: unknown shape {s.shape!r}; choose from {', '.join(SHAPE_CHOICES)}")
            s.shape = SHAPE_ALIASES.get(s.shape, s.shape)
        elif s.model is None and s.device.startswith("cuda"):
            s.shape = "8b"
        if not s.specs:
            raise LongctxError("--kv: give at least one KV spec")
        for spec in s.specs:
            KVSpec.parse(spec)  # a bad spec fails before any model loads
        if len(set(s.specs)) != len(s.specs):
            raise LongctxError(f"--kv: a spec is given twice ({', '.join(s.specs)})")
        lo, hi = s.prompt_len
        if not 1 <= lo <= hi:
            raise LongctxError(f"--prompt-len: need 1 <= MIN <= MAX, got {lo}:{hi}")
        for name, value in (("--num-requests", s.num_requests), ("--output-len", s.output_len),
                            ("--max-num-seqs", s.max_num_seqs), ("--max-num-batched-tokens", s.max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LongctxError(f"{name}: must be a positive integer, got {value!r}")
        if s.arrival not in ("all", "poisson"):
            raise LongctxError(f"--arrival: {s.arrival!r} is not 'all' or 'poisson'")
        if not (math.isfinite(s.rate) and s.rate > 0):
            raise LongctxError(f"--rate: must be a positive number of requests/s, got {s.rate!r}")
        if s.ttft_slo is not None and not (math.isfinite(s.ttft_slo) and s.ttft_slo > 0):
            raise LongctxError(f"--ttft-slo: must be a positive number of seconds, got {s.ttft_slo!r}")
        if s.baseline not in ("hf", "none"):
            raise LongctxError(f"--baseline: {s.baseline!r} is not 'hf' or 'none'")
        if not 0 < s.kv_memory_gb <= 1 << 20:
            raise LongctxError(f"--kv-memory: must be a positive number of GiB, got {s.kv_memory_gb!r}")
        if s.warmup is None:
            s.warmup = 1 if s.device.startswith("cuda") else 0
        if s.warmup < 0:
            raise LongctxError(f"--warmup: must be 0 or more, got {s.warmup}")
        return s


def split_specs(texts: list[str] | str) -> list[str]:
    """KV specs from ``--kv`` values: each value may hold several, separated by ``,`` or ``;`` outside
    parentheses (``snapkv(window=32,kernel=5)`` stays one spec)."""
    out: list[str] = []
    for text in [texts] if isinstance(texts, str) else texts:
        depth, start = 0, 0
        for i, ch in enumerate(text + ","):
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth = max(depth - 1, 0)
            elif ch in ",;" and depth == 0:
                part = text[start:i].strip()
                if part:
                    out.append(part)
                start = i + 1
    return out


# ---- the workload ------------------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: list[list[int]]
    arrivals: list[float]  # seconds after the start of the run, non-decreasing

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


def make_workload(num_requests: int, prompt_len: tuple[int, int], vocab_size: int, arrival: str = "all",
                  rate: float = 1.0, seed: int = 0) -> Workload:
    """Seeded prompts of random token ids (lengths uniform in ``prompt_len``, inclusive) and arrival times:
    all 0, or Poisson at ``rate`` requests/s (the first at 0). The prompts do not depend on the arrivals."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=num_requests)
    prompts = [rng.integers(0, vocab_size, size=int(n)).tolist() for n in lens]
    if arrival == "poisson":
        gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, size=num_requests)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()
    else:
        arrivals = [0.0] * num_requests
    return Workload(prompts, arrivals)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99]).tolist()
    return {"mean": float(a.mean()), "p50": p50, "p90": p90, "p99": p99}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- longctx: one spec -------------------------------------------------------------------------------------
def _replay(llm: LLM, spec: str, wl: Workload, output_len: int, bar: tqdm | None) -> dict[str, Any]:
    """Feed the workload to ``llm.engine`` (each request added at its arrival time) and step until every
    request has finished. Returns the raw measurements."""
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    n = len(wl.prompts)
    outputs: dict[str, Any] = {}
    rid_index: dict[str, int] = {}
    lateness: dict[str, float] = {}  # seconds a request was added after its arrival time
    running: list[int] = []
    preempted_before = engine.stats().preempted
    next_i = 0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter()
        while next_i < n and t0 + wl.arrivals[next_i] <= now:
            rid = engine.add_request(wl.prompts[next_i], params, kv=spec, request_id=f"serve-{next_i}",
                                     stream=False)
            req = engine.requests.get(rid)
            added = req.start_time if req is not None else time.perf_counter()
            rid_index[rid] = next_i
            lateness[rid] = added - (t0 + wl.arrivals[next_i])
            next_i += 1
        if not engine.has_unfinished_requests():
            if next_i >= n:
                break
            time.sleep(max(0.0, t0 + wl.arrivals[next_i] - time.perf_counter()))
            continue
        finished = engine.step()
        for out in finished:
            if out.request_id in rid_index:
                outputs[out.request_id] = out
        # The sequences that ran in this step: those still running after it plus those it finished.
        running.append(engine.stats().running + sum(1 for o in finished if o.stats.finish_reason != "error"))
        if bar is not None and finished:
            bar.update(len(finished))
    end = time.perf_counter()
    lost = sorted(set(rid_index) - set(outputs), key=rid_index.__getitem__)
    if len(rid_index) != n or lost:
        raise RuntimeError(f"{spec}: {len(lost) + n - len(rid_index)} of {n} requests never finished "
                           f"(e.g. {lost[:3]})")
    return {"outputs": outputs, "lateness": lateness, "running": running, "t0": t0, "end": end,
            "preemptions": engine.stats().preempted - preempted_before}


def _pool_peak_bytes(llm: LLM) -> int:
    pool = llm.pool
    return pool.peak_used_blocks * pool.bytes_per_block + sum(qp.peak_used_blocks * qp.bytes_per_block
                                                              for qp in pool.quant_pools.values())


def _reset_pool_peaks(llm: LLM) -> None:
    for p in (llm.pool, *llm.pool.quant_pools.values()):
        p.peak_used_blocks = p.num_used_blocks


def _check_pool_empty(llm: LLM, spec: str) -> None:
    used = llm.engine.stats().blocks_used
    if llm.pool.num_used_blocks != 0 or used != 0:
        raise RuntimeError(f"{spec}: {used} KV blocks still in use after every request finished")


def run_spec(llm: LLM, spec: str, wl: Workload, s: ServeSettings) -> dict[str, Any]:
    """Warm up (a few short requests, then ``s.warmup`` untimed replays), then replay ``wl`` once, measured;
    the spec's result entry."""
    few = wl.prompts[:WARM_REQUESTS]
    llm.generate(few, SamplingParams(max_tokens=min(2, s.output_len), ignore_eos=True), kv=spec, share_prefix=False)
    _check_pool_empty(llm, spec)
    for i in range(s.warmup or 0):
        with tqdm(total=len(wl.prompts), desc=f"{spec} (warm-up {i + 1})", unit="req", leave=False,
                  disable=not s.progress) as bar:
            _replay(llm, spec, wl, s.output_len, bar)
        _check_pool_empty(llm, spec)
    _reset_pool_peaks(llm)
    if s.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tqdm(total=len(wl.prompts), desc=spec, unit="req", disable=not s.progress) as bar:
        raw = _replay(llm, spec, wl, s.output_len, bar)
    _check_pool_empty(llm, spec)
    outs = raw["outputs"]
    ok = [o for o in outs.values() if o.stats.finish_reason != "error"]
    failed = [o for o in outs.values() if o.stats.finish_reason == "error"]
    ttft = {rid: o.stats.time_to_first_token + raw["lateness"][rid] for rid, o in outs.items()}
    duration = raw["end"] - raw["t0"]
    generated = sum(o.stats.generated_tokens for o in outs.values())
    ttfts = [ttft[o.request_id] for o in ok]
    tpots = [o.stats.time_per_output_token for o in ok]
    latency = [ttft[o.request_id] + o.stats.time_per_output_token * max(o.stats.generated_tokens - 1, 0)
               for o in ok]
    running = raw["running"]
    entry: dict[str, Any] = {
        "spec": spec,
        "canonical_spec": str(KVSpec.parse(spec)),
        "engine": "longctx",
        "requests": len(outs),
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({o.error or "" for o in failed})[:5],
        "generated_tokens": generated,
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": generated / duration,
        "ttft_s": percentiles(ttfts),
        "tpot_s": percentiles(tpots),
        "latency_s": percentiles(latency),
        "queue_time_s": percentiles([o.stats.queue_time + raw["lateness"][o.request_id] for o in ok]),
        "concurrency": {"mean": float(np.mean(running)) if running else 0.0, "max": max(running, default=0)},
        "steps": len(running),
        "preemptions": raw["preemptions"],
        "peak_kv_bytes": _pool_peak_bytes(llm),
        "kv_memory_bytes": llm.engine.kv.capacity_blocks * llm.pool.bytes_per_block,
        "kv_bytes_per_request": float(np.mean([o.stats.kv_bytes_peak for o in ok])) if ok else None,
        "kv_bytes_per_request_held": float(np.mean([o.stats.kv_bytes_held for o in ok])) if ok else None,
        "kv_bytes_per_request_full": float(np.mean([o.stats.kv_bytes_full for o in ok])) if ok else None,
        "goodput_requests_per_s": None,
        "ttft_slo_met": None,
        "max_arrival_lateness_s": max(raw["lateness"].values(), default=0.0),
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if s.device.startswith("cuda") else None,
        "batch_size": None,
    }
    _add_goodput(entry, ttfts, duration, s)
    return entry


def _add_goodput(entry: dict[str, Any], ttfts: list[float], duration: float, s: ServeSettings) -> None:
    if s.arrival != "poisson":
        return
    good = len(ttfts) if s.ttft_slo is None else sum(1 for t in ttfts if t <= s.ttft_slo)
    entry["goodput_requests_per_s"] = good / duration
    entry["ttft_slo_met"] = good if s.ttft_slo is not None else None


# ---- the Hugging Face baseline -----------------------------------------------------------------------------
def _load_hf(s: ServeSettings, model_path: str | None, loaded: LoadedModel):  # noqa: ANN202
    """``transformers`` model on the same weights: our random model's tensors shared (a shape), else the
    checkpoint loaded by ``AutoModelForCausalLM`` (a ``.gguf`` through its GGUF reader)."""
    if model_path is None:
        return hf_llama(loaded.model, loaded.config, s.device)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    p = Path(model_path).expanduser()
    bars = hf_logging.is_progress_bar_enabled()
    if not s.progress:
        hf_logging.disable_progress_bar()
    try:
        if p.is_dir():
            hf = AutoModelForCausalLM.from_pretrained(p, dtype=DTYPES[s.dtype])
        else:
            hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=DTYPES[s.dtype])
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return hf.to(s.device).eval()


def _hf_batch(hf, prompts: list[list[int]], output_len: int, device: str, pad: int) -> list[float]:  # noqa: ANN001
    """One static batch through ``generate`` (left-padded); returns the time stamps at which each step's
    logits were ready."""
    from transformers import LogitsProcessor, LogitsProcessorList  # noqa: PLC0415

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                    max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=pad,
                    logits_processor=LogitsProcessorList([Stamp()]), temperature=None, top_p=None, top_k=None)
    _sync(device)
    return stamps


def _hf_pad(hf) -> int:  # noqa: ANN001
    gen = getattr(hf, "generation_config", None)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(gen, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) and pad else pad
    return int(pad) if pad is not None else 0


def hf_candidate_batches(num_requests: int, device: str) -> list[int]:
    if device.startswith("cuda"):
        out, b = [], 1
        while b < num_requests:
            out.append(b)
            b *= 2
        return [*out, num_requests]
    return sorted({min(b, num_requests) for b in HF_CPU_BATCHES})


def run_hf_baseline(hf, cfg: ModelConfig, wl: Workload, s: ServeSettings) -> dict[str, Any]:  # noqa: ANN001
    """Static batching: probe each candidate batch size on one batch of the longest prompts (stopping at the
    first OOM on a GPU), keep the fastest, then replay the workload with it: whenever ``generate`` is idle it
    takes up to that many of the requests that have arrived, in arrival order."""
    device, out_len = s.device, s.output_len
    pad = _hf_pad(hf)
    longest = sorted(wl.prompts, key=len, reverse=True)
    probes: list[dict[str, Any]] = []
    for b in tqdm(hf_candidate_batches(len(wl.prompts), device), desc="HF batch sizes", unit="batch",
                  disable=not s.progress, leave=False):
        try:
            t = time.perf_counter()
            _hf_batch(hf, longest[:b], out_len, device, pad)
            elapsed = time.perf_counter() - t
            probes.append({"batch_size": b, "output_tokens_per_s": b * out_len / elapsed, "oom": False})
        except torch.OutOfMemoryError:
            probes.append({"batch_size": b, "output_tokens_per_s": None, "oom": True})
            gc.collect()
            torch.cuda.empty_cache()
            break
    fits = [p for p in probes if not p["oom"]]
    if not fits:
        raise LongctxError("Hugging Face baseline: even one request does not fit in device memory "
                           "(use --baseline none)")
    best = max(fits, key=lambda p: p["output_tokens_per_s"])["batch_size"]
    elsize = next(hf.parameters()).element_size()
    n = len(wl.prompts)
    ttft, tpot, latency, batch_sizes = [0.0] * n, [0.0] * n, [0.0] * n, []
    peak_kv, kv_per_request = 0, [0] * n
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    next_i = 0
    t0 = time.perf_counter()
    with tqdm(total=n, desc=f"HF generate (batch {best})", unit="req", disable=not s.progress) as bar:
        while next_i < n:
            wait = t0 + wl.arrivals[next_i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            now = time.perf_counter()
            batch = []
            while next_i < n and len(batch) < best and t0 + wl.arrivals[next_i] <= now:
                batch.append(next_i)
                next_i += 1
            stamps = _hf_batch(hf, [wl.prompts[i] for i in batch], out_len, device, pad)
            width = max(len(wl.prompts[i]) for i in batch)
            step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
            for i in batch:
                ttft[i] = stamps[0] - (t0 + wl.arrivals[i])
                tpot[i] = step
                latency[i] = stamps[-1] - (t0 + wl.arrivals[i])
                kv_per_request[i] = kv_bytes_for_tokens(cfg, width + out_len, elsize)
            peak_kv = max(peak_kv, len(batch) * kv_bytes_for_tokens(cfg, width + out_len, elsize))
            batch_sizes.append(len(batch))
            bar.update(len(batch))
    duration = time.perf_counter() - t0
    generated = n * out_len  # min_new_tokens = max_new_tokens
    entry: dict[str, Any] = {
        "spec": "full", "canonical_spec": "full", "engine": "transformers", "requests": n, "completed": n,
        "failed": 0, "errors": [], "generated_tokens": generated, "duration_s": duration,
        "requests_per_s": n / duration, "output_tokens_per_s": generated / duration,
        "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "latency_s": percentiles(latency),
        "queue_time_s": None,
        "concurrency": {"mean": float(np.mean(batch_sizes)), "max": max(batch_sizes)},
        "steps": len(batch_sizes) * out_len, "preemptions": 0,
        "peak_kv_bytes": peak_kv, "kv_memory_bytes": None,
        "kv_bytes_per_request": float(np.mean(kv_per_request)),
        "kv_bytes_per_request_held": float(np.mean(kv_per_request)),
        "kv_bytes_per_request_full": float(np.mean(kv_per_request)),
        "goodput_requests_per_s": None, "ttft_slo_met": None, "max_arrival_lateness_s": None,
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "batch_size": best, "batch_size_probes": probes,
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
    }
    _add_goodput(entry, ttft, duration, s)
    return entry


# ---- the whole benchmark -----------------------------------------------------------------------------------
def _load(s: ServeSettings) -> tuple[LoadedModel, str | None]:
    """The model (random weights of a shape, else a checkpoint) and the checkpoint path (None for a shape)."""
    max_len = s.prompt_len[1] + s.output_len
    if s.shape is not None:
        cfg = shape_config(s.shape, max_len)
        model = random_model(cfg, s.device, DTYPES[s.dtype], seed=s.seed)
        return LoadedModel(model, cfg, None, Path(f"<random {s.shape}>")), None
    if s.model is None:
        from longctx.model.default_model import default_model_path  # noqa: PLC0415

        path = str(default_model_path())
    else:
        path = s.model
    return load_model(path, device=s.device, dtype=s.dtype), path


def _ratios(results: list[dict[str, Any]], baseline: dict[str, Any] | None) -> None:
    full = next((r for r in results if r["spec"] == "full"), None)
    for r in [*results, *([baseline] if baseline else [])]:
        if full is None or not full["output_tokens_per_s"] or not full["concurrency"]["mean"]:
            r["ratio_to_full"] = None
            continue
        r["ratio_to_full"] = {"output_tokens_per_s": r["output_tokens_per_s"] / full["output_tokens_per_s"],
                              "concurrency_mean": r["concurrency"]["mean"] / full["concurrency"]["mean"]}


def _environment(s: ServeSettings) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": s.device,
        "device_name": torch.cuda.get_device_name(torch.device(s.device)) if s.device.startswith("cuda")
        else cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if s.device.startswith("cuda") else None,
    }
    try:
        import transformers  # noqa: PLC0415

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    env["machine"] = machine_info()
    return env


def run_serve(settings: ServeSettings) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (also written to ``settings.out`` when given)."""
    s = settings.resolved()
    out = prepare_output_dir(s.out) if s.out else None  # fail now, not after the benchmark
    loaded, path = _load(s)
    cfg = loaded.config
    if s.prompt_len[1] + s.output_len > cfg.max_position_embeddings:
        raise LongctxError(f"--prompt-len/--output-len: {s.prompt_len[1]} + {s.output_len} tokens exceed the "
                           f"model's context of {cfg.max_position_embeddings}")
    wl = make_workload(s.num_requests, s.prompt_len, cfg.vocab_size, s.arrival, s.rate, s.seed)
    results = []
    for spec in s.specs:
        quantized = KVSpec.parse(spec).quant.name != "none"
        # Every spec gets a fresh engine over the same fixed KV memory (no state carried between specs). fp pools
        # are allocated up front on a GPU (captured CUDA graphs never see them move); quantized specs need room
        # for their own pool inside the same byte budget, so theirs grows on demand.
        llm = LLM(loaded, device=s.device, dtype=DTYPES[s.dtype], max_kv_bytes=int(s.kv_memory_gb * (1 << 30)),
                  max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                  preallocate_kv=s.device.startswith("cuda") and not quantized)
        try:
            results.append(run_spec(llm, spec, wl, s))
        finally:
            del llm
            gc.collect()
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()
    baseline = None
    if s.baseline == "hf":
        hf = _load_hf(s, path, loaded)
        if path is not None:  # the checkpoint was loaded a second time: let ours go
            del loaded
            gc.collect()
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()
        baseline = run_hf_baseline(hf, cfg, wl, s)
        del hf
    _ratios(results, baseline)
    settings_json = {k: v for k, v in asdict(s).items() if k not in ("progress", "out")}
    settings_json["prompt_len"] = list(s.prompt_len)
    settings_json["rate"] = s.rate if s.arrival == "poisson" else None
    settings_json["model"] = path if path is not None else f"<random {s.shape}>"
    settings_json["prompt_tokens_total"] = wl.num_prompt_tokens
    data = {"schema": SCHEMA, "created": now_iso(), "settings": settings_json, "results": results,
            "baseline": baseline, "environment": _environment(s)}
    if out is not None:
        write_text(out / "serve.json", json.dumps(data, indent=1))
        plot(data, out / "serve.png")
    return data


# ---- output ------------------------------------------------------------------------------------------------
def _ms3(p: dict[str, float | None] | None) -> str:
    if not p or p["p50"] is None:
        return "-"
    return "/".join(f"{p[k] * 1e3:.0f}" if p[k] >= 0.1 else f"{p[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))


def _ratio(r: dict[str, Any], key: str) -> str:
    ratio = r.get("ratio_to_full")
    return f"{ratio[key]:.2f}" if ratio else "-"


def _arrival_text(st: dict[str, Any]) -> str:
    return "all arriving at once" if st["arrival"] == "all" else f"Poisson arrivals at {st['rate']:g} req/s"


def format_table(data: dict[str, Any]) -> str:
    rows = [*data["results"], *([data["baseline"]] if data["baseline"] else [])]
    head = ["spec", "req/s", "tok/s", "x full", "TTFT ms p50/90/99", "TPOT ms p50/90/99", "conc mean/max",
            "x full", "preempt", "peak KV", "KV/req", "held/req", "goodput", "failed"]
    table = [head]
    for r in rows:
        name = r["spec"] if r["engine"] == "longctx" else f"HF generate (batch {r['batch_size']})"
        good = r["goodput_requests_per_s"]
        table.append([
            name, f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}", _ratio(r, "output_tokens_per_s"),
            _ms3(r["ttft_s"]), _ms3(r["tpot_s"]),
            f"{r['concurrency']['mean']:.1f}/{r['concurrency']['max']}", _ratio(r, "concurrency_mean"),
            str(r["preemptions"]), human_bytes(r["peak_kv_bytes"]),
            *(human_bytes(r[k]) if r[k] is not None else "-" for k in ("kv_bytes_per_request",
                                                                        "kv_bytes_per_request_held")),
            f"{good:.2f}" if good is not None else "-", str(r["failed"]),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    st = data["settings"]
    lo, hi = st["prompt_len"]
    title = (f"{st['model']} on {data['environment']['device_name']} ({st['dtype']}): {st['num_requests']} requests, "
             f"prompts {lo if lo == hi else f'{lo}-{hi}'} tokens, {st['output_len']} output tokens, "
             f"{_arrival_text(st)}, KV memory {st['kv_memory_gb']:g} GiB, max {st['max_num_seqs']} seqs")
    return "\n".join([title, *lines])


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in [*data["results"], data["baseline"]] if r and r["kv_bytes_per_request"] is not None]
    top = max((r["kv_bytes_per_request"] for r in rows), default=1.0)
    unit, scale = next(((u, 1024.0 ** k) for k, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if top >= 1024.0 ** k),
                       ("B", 1.0))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    panels = (("output_tokens_per_s", "output tokens/s"), ("concurrency", "mean concurrent sequences"))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for r in rows:
            y = r[key]["mean"] if key == "concurrency" else r[key]
            hf = r["engine"] == "transformers"
            label = f"HF generate (b={r['batch_size']})" if hf else r["spec"]
            x = r["kv_bytes_per_request"] / scale
            ax.scatter([x], [y], marker="s" if hf else "o",
                       color="0.4" if hf else ("black" if r["spec"] == "full" else None), zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(f"KV per request, mean of each request's peak ({unit})")
        ax.set_ylabel(ylabel)
        ax.margins(x=0.3, y=0.2)
        ax.autoscale_view()
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    st = data["settings"]
    fig.suptitle(f"{Path(str(st['model'])).name}: {st['num_requests']} requests, {_arrival_text(st)}, "
                 f"KV memory {st['kv_memory_gb']:g} GiB", fontsize=10)
    with open_for_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)

