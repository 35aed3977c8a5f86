"""CPU generation speed of longctx against Hugging Face transformers on the same checkpoint and prompt.

What: one real-text prompt of ``--prompt-tokens`` tokens (Jane Austen's *Emma* from the shared corpora when
present, else longctx's built-in haystack), greedy generation of exactly ``--new-tokens`` tokens, fp32, on the
CPU. Three engines run in the same process on the same token ids:

* ``transformers``: ``AutoModelForCausalLM`` loading the same GGUF (dequantized to fp32, as longctx does) or
  checkpoint folder, ``generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` with an explicit
  attention mask. This is the baseline.
* ``longctx full``: ``LLM(path).generate(..., SamplingParams(max_tokens=N, ignore_eos=True))``.
* ``longctx snapkv:256``: the same with a SnapKV cache of 256 tokens per row, to show the compressed decode.

Per engine: prefill time (time to first token), decode tokens/s (tokens after the first over the time after the
first), end-to-end tokens/s (new tokens over the whole call), and memory (RSS added by loading the model, and
the largest RSS rise during one generate call). The three engines are warmed up once, then run interleaved
``--repeats`` times (engine A, B, C, A, B, C, ...) so that load from other processes on a shared CPU hits all
of them alike; reported numbers are medians over the repeats. Ratios are longctx / transformers.

Why: longctx runs its own packed-batch forward pass and paged KV pool; this checks what that costs (or saves)
against the reference implementation on a small CPU, where per-step Python overhead shows.

    python -m longctx.bench.cpu_generation [--model PATH] [--prompt-tokens 2048] [--new-tokens 32]
                                           [--repeats 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from longctx.bench.common import (
    common_prefix,
    load_text,
    loadavg,
    machine_info,
    median,
    now_iso,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    set_threads,
)
from longctx.model.tokenizer import Tokenizer

SCHEMA = "longctx.bench.cpu_generation/1"
BASELINE = "transformers"
RATIO_METRICS = ("prefill_s", "prefill_tok_s", "decode_tok_s", "e2e_tok_s")
BEST_METRICS = ("best_prefill_s", "best_decode_tok_s", "best_e2e_tok_s")


@dataclass
class RunTiming:
    """One timed generate call."""

    prefill_s: float  # time to first token
    decode_s: float  # time from the first to the last token
    total_s: float  # the whole generate call
    generated_tokens: int
    run_peak_extra_mib: float | None = None  # peak RSS during the call minus RSS before it


@dataclass
class EngineResult:
    """Medians over the repeats for one engine configuration."""

    name: str
    engine: str  # "longctx" or "transformers"
    kv: str  # KV method ("full" for transformers' dynamic cache)
    prompt_tokens: int
    new_tokens: int
    load_s: float
    load_rss_delta_mib: float | None
    prefill_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    e2e_tok_s: float = 0.0
    total_s: float = 0.0
    run_peak_extra_mib: float | None = None
    kv_bytes_held: int | None = None
    tokens_matching_baseline: int | None = None  # leading generated tokens equal to transformers' output
    # Best of the repeats (least disturbed by other load) and the spread, for judging noise.
    best_prefill_s: float = 0.0
    best_decode_tok_s: float = 0.0
    best_e2e_tok_s: float = 0.0
    range_prefill_s: tuple[float, float] = (0.0, 0.0)
    range_decode_tok_s: tuple[float, float] = (0.0, 0.0)
    range_e2e_tok_s: tuple[float, float] = (0.0, 0.0)
    runs: list[RunTiming] = field(default_factory=list)

    def summarize(self) -> None:
        n = self.new_tokens
        prefill = [r.prefill_s for r in self.runs]
        decode = [(n - 1) / r.decode_s for r in self.runs]
        e2e = [n / r.total_s for r in self.runs]
        self.prefill_s = median(prefill)
        self.prefill_tok_s = self.prompt_tokens / self.prefill_s
        self.decode_tok_s = median(decode)
        self.total_s = median([r.total_s for r in self.runs])
        self.e2e_tok_s = median(e2e)
        self.best_prefill_s, self.best_decode_tok_s, self.best_e2e_tok_s = min(prefill), max(decode), max(e2e)
        self.range_prefill_s = (min(prefill), max(prefill))
        self.range_decode_tok_s = (min(decode), max(decode))
        self.range_e2e_tok_s = (min(e2e), max(e2e))
        extras = [r.run_peak_extra_mib for r in self.runs if r.run_peak_extra_mib is not None]
        self.run_peak_extra_mib = max(extras) if extras else None


class _Measure:
    """Times one call and the RSS it adds at peak."""

    def __enter__(self) -> _Measure:
        gc.collect()
        self.ok = reset_peak_rss()
        self.before = rss_mib()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        peak = peak_rss_mib()
        self.extra = peak - self.before if self.ok and peak is not None and self.before is not None else None


# ---- engines -----------------------------------------------------------------------------------------------
class LongctxEngine:
    def __init__(self, model: str | Path) -> None:
        from longctx.engine.llm import LLM  # noqa: PLC0415

        before = rss_mib()
        t0 = time.perf_counter()
        self.llm = LLM(model, device="cpu", dtype="fp32")
        self.load_s = time.perf_counter() - t0
        after = rss_mib()
        self.load_rss_delta_mib = after - before if after is not None and before is not None else None

    def run(self, ids: list[int], new_tokens: int, kv: str) -> tuple[RunTiming, list[int], int]:
        from longctx.engine.sampling import SamplingParams  # noqa: PLC0415

        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        with _Measure() as m:
            out = self.llm.generate([ids], params, kv=kv)[0]
        s = out.stats
        decode_s = s.time_per_output_token * max(s.generated_tokens - 1, 1)
        timing = RunTiming(s.time_to_first_token, decode_s, m.elapsed, s.generated_tokens, m.extra)
        return timing, list(out.token_ids), s.kv_bytes_held


class TransformersEngine:
    def __init__(self, model: str | Path) -> None:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        p = Path(model).expanduser()
        before = rss_mib()
        t0 = time.perf_counter()
        if p.is_dir():
            self.model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        after = rss_mib()
        self.load_rss_delta_mib = after - before if after is not None and before is not None else None
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)

    @torch.inference_mode()
    def run(self, ids: list[int], new_tokens: int) -> tuple[RunTiming, list[int]]:
        from transformers import LogitsProcessor, LogitsProcessorList  # noqa: PLC0415

        stamps: list[float] = []

        class Stamp(LogitsProcessor):
            """Records when each step's logits are ready (after its forward pass, before the argmax)."""

            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                stamps.append(time.perf_counter())
                return scores

        input_ids = torch.tensor([ids], dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.generation_config.eos_token_id
            pad = pad[0] if isinstance(pad, list) else pad
        with _Measure() as m:
            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=pad,
                temperature=None, top_p=None, top_k=None,
            )
        generated = out[0, len(ids):].tolist()
        timing = RunTiming(stamps[0] - t0, stamps[-1] - stamps[0], m.elapsed, len(generated), m.extra)
        return timing, generated


# ---- the benchmark -----------------------------------------------------------------------------------------
def prompt_ids(tokenizer: Tokenizer, prompt_tokens: int, text_path: str | Path | None = None) -> tuple[list[int], str]:
    """The first ``prompt_tokens`` token ids of the text (repeated if it is too short) and the text's source."""
    text, source = load_text(text_path)
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"{source}: no tokens")
    while len(ids) < prompt_tokens:
        ids = ids + ids
    return ids[:prompt_tokens], source


def run_benchmark(
    model: str | Path,
    prompt_tokens: int = 2048,
    new_tokens: int = 32,
    repeats: int = 2,
    snapkv_tokens: int = 256,
    text_path: str | Path | None = None,
    threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Warm up each engine once, run them interleaved ``repeats`` times and return the JSON-ready result."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (decode speed is measured over the tokens after the first)")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    say = log or (lambda _msg: None)
    set_threads(threads)
    load_before = loadavg()
    started = time.perf_counter()
    say(f"loading longctx: {model}")
    lc = LongctxEngine(model)
    ids, source = prompt_ids(lc.llm.tokenizer, prompt_tokens, text_path)
    say(f"loading transformers: {model}")
    hf = TransformersEngine(model)
    snap = f"snapkv:{snapkv_tokens}"
    configs: list[tuple[str, str, str]] = [  # (name, engine, kv)
        (BASELINE, "transformers", "full"),
        ("longctx", "longctx", "full"),
        (f"longctx {snap}", "longctx", snap),
    ]
    results = {
        name: EngineResult(name, engine, kv, len(ids), new_tokens,
                           load_s=(hf if engine == "transformers" else lc).load_s,
                           load_rss_delta_mib=(hf if engine == "transformers" else lc).load_rss_delta_mib)
        for name, engine, kv in configs
    }
    outputs: dict[str, list[int]] = {}

    def once(name: str, engine: str, kv: str) -> RunTiming:
        if engine == "transformers":
            timing, tokens = hf.run(ids, new_tokens)
        else:
            timing, tokens, kv_bytes = lc.run(ids, new_tokens, kv)
            results[name].kv_bytes_held = kv_bytes
        outputs[name] = tokens
        return timing

    for name, engine, kv in configs:
        say(f"warm-up: {name}")
        once(name, engine, kv)
    for r in range(repeats):
        for name, engine, kv in configs:
            timing = once(name, engine, kv)
            results[name].runs.append(timing)
            say(f"repeat {r + 1}/{repeats} {name}: prefill {timing.prefill_s:.2f} s, "
                f"decode {(new_tokens - 1) / timing.decode_s:.1f} tok/s, total {timing.total_s:.2f} s")
    for res in results.values():
        res.summarize()
        res.tokens_matching_baseline = common_prefix(outputs[res.name], outputs[BASELINE])

    base = results[BASELINE]
    ratios = {
        name: {metric: getattr(res, metric) / getattr(base, metric) for metric in RATIO_METRICS}
        for name, res in results.items() if name != BASELINE
    }
    ratios_best = {
        name: {metric: getattr(res, metric) / getattr(base, metric) for metric in BEST_METRICS}
        for name, res in results.items() if name != BASELINE
    }
    machine = machine_info(load_before)
    return {
        "schema": SCHEMA,
        "date": now_iso(),
        "machine": machine,
        "config": {
            "model": str(model),
            "prompt_tokens": len(ids),
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": 1,
            "dtype": "fp32",
            "text": source,
            "snapkv_tokens": snapkv_tokens,
            "transformers_attn_implementation": hf.attn_implementation,
            "transformers_version": _transformers_version(),
        },
        "results": [asdict(results[name]) for name, _, _ in configs],
        "ratios": ratios,
        "ratios_best": ratios_best,
        "wall_s": time.perf_counter() - started,
    }


def _transformers_version() -> str:
    import transformers  # noqa: PLC0415

    return transformers.__version__


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _range(lo_hi: list[float] | tuple[float, float], spec: str) -> str:
    return f"{format(lo_hi[0], spec)}-{format(lo_hi[1], spec)}"


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the medians (with the min-max over repeats), then ratio rows: medians and best-of."""
    rows = [
        "| engine | KV | prefill s (min-max) | prefill tok/s | decode tok/s (min-max) | end-to-end tok/s (min-max) "
        "| KV held MiB | load RSS +MiB | run peak RSS +MiB | tokens = baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    new = result["config"]["new_tokens"]
    for r in result["results"]:
        kv_mib = None if r["kv_bytes_held"] is None else r["kv_bytes_held"] / (1 << 20)
        same = "-" if r["name"] == BASELINE else f"{r['tokens_matching_baseline']}/{new}"
        rows.append(
            f"| {r['name']}{' (baseline)' if r['name'] == BASELINE else ''} | {r['kv']} "
            f"| {r['prefill_s']:.2f} ({_range(r['range_prefill_s'], '.2f')}) | {r['prefill_tok_s']:.0f} "
            f"| {r['decode_tok_s']:.1f} ({_range(r['range_decode_tok_s'], '.1f')}) "
            f"| {r['e2e_tok_s']:.2f} ({_range(r['range_e2e_tok_s'], '.2f')}) | {_fmt(kv_mib, '.1f')} "
            f"| {_fmt(r['load_rss_delta_mib'], '.0f')} | {_fmt(r['run_peak_extra_mib'], '.0f')} | {same} |"
        )
    for name, ratio in result["ratios"].items():
        best = result["ratios_best"][name]
        rows.append(
            f"| **{name} / {BASELINE}** (median; best-of) | | {ratio['prefill_s']:.2f}x; {best['best_prefill_s']:.2f}x "
            f"| {ratio['prefill_tok_s']:.2f}x | {ratio['decode_tok_s']:.2f}x; {best['best_decode_tok_s']:.2f}x "
            f"| {ratio['e2e_tok_s']:.2f}x; {best['best_e2e_tok_s']:.2f}x | | | | |"
        )
    m, c = result["machine"], result["config"]
    rows.append("")
    rows.append(
        f"{c['prompt_tokens']}-token prompt ({Path(c['text']).name}), {new} new tokens, fp32, medians of "
        f"{c['repeats']} interleaved repeats after 1 warm-up (best-of = fastest repeat of each engine); "
        f"{m['torch_threads']} torch threads on {m['cpu_count']} CPUs ({m['cpu']}); load average before "
        f"{m['loadavg_before']}, after {m['loadavg_after']}. Ratios: a time ratio < 1 and a tok/s ratio > 1 mean "
        "longctx is faster."
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longctx.bench.cpu_generation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder or .gguf (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--snapkv-tokens", type=int, default=256, help="budget of the compressed longctx run")
    parser.add_argument("--text", help="prompt text file (default: shared corpora austen_emma.txt, else built-in)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    model = args.model
    if not model:
        from longctx.model.default_model import default_model_path  # noqa: PLC0415

        model = str(default_model_path())
    result = run_benchmark(model, args.prompt_tokens, args.new_tokens, args.repeats, args.snapkv_tokens, args.text,
                           args.threads, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
