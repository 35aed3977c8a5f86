"""Needle retrieval and KV memory per KV method: does SmolLM2 still find the code word, and what does the cache hold?

What: a needle prompt of ``--tokens`` tokens (haystack cut from Jane Austen's *Emma* in the shared corpora when
present, else longctx's built-in haystack; the code word hidden at each of ``--depths``; the chat template on)
is answered under every retain method at every token budget in ``--budgets``, plus the full cache. For each
(method, budget) the table shows whether the answer holds the code word at each depth and the KV bytes the
request really held in the block pool at the end of generation (``RequestOutput.stats.kv_bytes_held``), against
the full cache's.

All requests of one prompt go through a single ``LLM.generate([...], kv=[spec, spec, ...])`` call: each request
carries its own KV method in one batch.

Methods (``--methods``, comma-separated keys; ``B`` is the budget in tokens per row):

* ``full``: the uncompressed cache (run once per depth, not per budget);
* ``streamingllm``, ``h2o``, ``tova``, ``snapkv``, ``a2sf``, ``corm``, ``keynorm``: ``METHOD:B``;
* ``snapkv+pyramid``: ``retain=snapkv budget=pyramid(tokens=B)`` (PyramidKV layer budgets);
* ``snapkv+adaptive``: ``retain=snapkv budget=adaptive(tokens=B)`` (AdaKV head budgets);
* ``snapkv+int8`` / ``snapkv+int4``: ``snapkv:B int8`` / ``snapkv:B int4`` (KIVI quantization on top).

Cost: h2o and a2sf need the attention mass every key receives, so their prefill runs the reference attention
(plain torch, query chunks of 512) instead of the fused SDPA kernel; on a 2-core CPU one 4K-token h2o/a2sf
prefill takes several minutes, about 5-10x a dense one. Each extra depth re-runs every request.

    python -m longctx.bench.needle_table [--tokens 4096] [--depths 0.5] [--budgets 256,1024] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from longctx.bench.common import load_text, loadavg, machine_info, median, now_iso, set_threads

SCHEMA = "longctx.bench.needle_table/1"
NEEDLE = "The secret code word is 'saffron'."
QUESTION = "What is the secret code word mentioned in the text above? Answer with one word."
ANSWER = "saffron"

SPECS: dict[str, Callable[[int], str]] = {
    "full": lambda b: "full",
    "streamingllm": lambda b: f"streamingllm:{b}",
    "h2o": lambda b: f"h2o:{b}",
    "tova": lambda b: f"tova:{b}",
    "snapkv": lambda b: f"snapkv:{b}",
    "a2sf": lambda b: f"a2sf:{b}",
    "corm": lambda b: f"corm:{b}",
    "keynorm": lambda b: f"keynorm:{b}",
    "snapkv+pyramid": lambda b: f"retain=snapkv budget=pyramid(tokens={b})",
    "snapkv+adaptive": lambda b: f"retain=snapkv budget=adaptive(tokens={b})",
    "snapkv+int8": lambda b: f"snapkv:{b} int8",
    "snapkv+int4": lambda b: f"snapkv:{b} int4",
}
DEFAULT_METHODS = tuple(SPECS)
# The brief's depths are 0.25,0.5,0.75; on the shared 2-core CPU one 4K-token depth of all 23 requests already
# takes most of the 25-minute budget (h2o/a2sf prefill on the reference path dominates), so one depth is default.
DEFAULT_DEPTHS = (0.5,)
DEFAULT_BUDGETS = (256, 1024)


@dataclass
class Cell:
    """One request: a method at a budget on the prompt with the needle at one depth."""

    method: str
    budget: int | None  # None for the full cache
    spec: str
    depth: float
    answer: str
    correct: bool
    kv_bytes_held: int
    kv_bytes_full: int
    kv_bytes_peak: int
    prompt_tokens: int
    generated_tokens: int


def plan(methods: list[str], budgets: list[int]) -> list[tuple[str, int | None, str]]:
    """(method, budget, spec) for every request of one prompt; ``full`` once, the others once per budget."""
    unknown = [m for m in methods if m not in SPECS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from: {', '.join(SPECS)}")
    out: list[tuple[str, int | None, str]] = []
    for m in methods:
        if m == "full":
            out.append((m, None, SPECS[m](0)))
        else:
            out.extend((m, b, SPECS[m](b)) for b in budgets)
    return out


def run_table(
    model: str | Path,
    tokens: int = 4096,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    haystack: str | Path | None = None,
    chat: bool = True,
    max_tokens: int = 16,
    threads: int = 2,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (method, budget) at every depth, one batched ``generate`` call per depth; JSON-ready result."""
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415
    from longctx.eval.needle import build_needle_prompt, is_correct  # noqa: PLC0415

    say = log or (lambda _msg: None)
    set_threads(threads)
    load_before = loadavg()
    started = time.perf_counter()
    requests = plan(list(methods), list(budgets))
    text, source = load_text(haystack)
    llm = LLM(model, device="cpu", dtype="fp32")
    params = SamplingParams(max_tokens=max_tokens)
    cells: list[Cell] = []
    per_depth_s: dict[str, float] = {}
    for depth in depths:
        prompt = build_needle_prompt(llm.tokenizer, tokens, depth, needle=NEEDLE, question=QUESTION, answer=ANSWER,
                                     haystack=text)
        say(f"depth {depth:.0%}: needle at haystack token {prompt.needle_token_offset} of {prompt.haystack_tokens}; "
            f"{len(requests)} requests in one batch")
        t0 = time.perf_counter()
        outs = llm.generate([prompt.text] * len(requests), params, kv=[spec for _, _, spec in requests], chat=chat)
        per_depth_s[f"{depth:g}"] = time.perf_counter() - t0
        say(f"depth {depth:.0%}: {per_depth_s[f'{depth:g}']:.0f} s, load average {loadavg()}")
        for (method, budget, spec), out in zip(requests, outs, strict=True):
            s = out.stats
            cells.append(Cell(method, budget, spec, depth, out.text.strip(), is_correct(out.text, ANSWER),
                              s.kv_bytes_held, s.kv_bytes_full, s.kv_bytes_peak, s.prompt_tokens,
                              s.generated_tokens))
    machine = machine_info(load_before)
    return {
        "schema": SCHEMA,
        "date": now_iso(),
        "machine": machine,
        "config": {
            "model": str(model),
            "tokens": tokens,
            "depths": list(depths),
            "budgets": list(budgets),
            "methods": list(methods),
            "haystack": source,
            "chat": chat,
            "max_tokens": max_tokens,
            "dtype": "fp32",
            "needle": NEEDLE,
            "question": QUESTION,
            "answer": ANSWER,
        },
        "cells": [asdict(c) for c in cells],
        "seconds_per_depth": per_depth_s,
        "wall_s": time.perf_counter() - started,
    }


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, budget): correctness per depth, median KV bytes held, and that over the full cache's."""
    cells = result["cells"]
    depths = result["config"]["depths"]
    full_by_depth = {c["depth"]: c["kv_bytes_held"] for c in cells if c["method"] == "full"}
    rows: list[dict[str, Any]] = []
    keys: list[tuple[str, int | None]] = list(dict.fromkeys((c["method"], c["budget"]) for c in cells))
    for method, budget in keys:
        mine = {c["depth"]: c for c in cells if c["method"] == method and c["budget"] == budget}
        held = median([float(c["kv_bytes_held"]) for c in mine.values()])
        ratios = [c["kv_bytes_held"] / full_by_depth[d] for d, c in mine.items() if full_by_depth.get(d)]
        rows.append({
            "method": method,
            "budget": budget,
            "spec": next(iter(mine.values()))["spec"],
            "correct": {f"{d:g}": mine[d]["correct"] if d in mine else None for d in depths},
            "num_correct": sum(bool(c["correct"]) for c in mine.values()),
            "kv_bytes_held": held,
            "vs_full": median(ratios) if ratios else None,
            "answers": {f"{d:g}": mine[d]["answer"] for d in depths if d in mine},
        })
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The markdown table: method, budget, right/wrong per depth, KV held and its fraction of the full cache."""
    depths = result["config"]["depths"]
    head = "| method | budget | spec | " + " | ".join(f"right @{d:.0%}" for d in depths) + " | KV held MiB | vs full |"
    lines = [head, "|---|---:|---|" + ":---:|" * len(depths) + "---:|---:|"]
    for row in summarize(result):
        marks = " | ".join({True: "yes", False: "no", None: "-"}[row["correct"][f"{d:g}"]] for d in depths)
        ratio = "-" if row["vs_full"] is None else f"{row['vs_full']:.1%}"
        lines.append(f"| {row['method']} | {row['budget'] or '-'} | `{row['spec']}` | {marks} "
                     f"| {row['kv_bytes_held'] / (1 << 20):.2f} | {ratio} |")
    c, m = result["config"], result["machine"]
    per = ", ".join(f"{k}: {v:.0f} s" for k, v in result["seconds_per_depth"].items())
    lines.append("")
    lines.append(
        f"{c['tokens']}-token haystack ({Path(c['haystack']).name}), chat template {'on' if c['chat'] else 'off'}, "
        f"greedy, {c['max_tokens']} new tokens, fp32; right = answer contains {c['answer']!r}. KV held = bytes the "
        f"request's rows hold in the pool at the end (median over depths). Time per depth ({per}), total "
        f"{result['wall_s'] / 60:.1f} min on {m['torch_threads']} torch threads, {m['cpu_count']} CPUs; load average "
        f"before {m['loadavg_before']}, after {m['loadavg_after']}."
    )
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longctx.bench.needle_table", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder or .gguf (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=4096, help="haystack length in tokens (default 4096)")
    parser.add_argument("--depths", type=_floats, default=DEFAULT_DEPTHS,
                        help="needle depths, comma-separated (default 0.5; each depth re-runs every request)")
    parser.add_argument("--budgets", type=_ints, default=DEFAULT_BUDGETS, help="token budgets (default 256,1024)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated method keys (default all: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--haystack", help="haystack text (default: shared corpora austen_emma.txt, else built-in)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in SPECS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from: {', '.join(SPECS)}")
    model = args.model
    if not model:
        from longctx.model.default_model import default_model_path  # noqa: PLC0415

        model = str(default_model_path())
    result = run_table(model, args.tokens, args.depths, args.budgets, methods, args.haystack, not args.no_chat,
                       args.max_tokens, args.threads, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "rows": summarize(result)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
