"""Where a decode step's time goes on the GPU (8B shape, random bf16 weights, batch 1).

For each context: wall time per output token from ``LLM.generate``; GPU time of one CUDA-graph replay of the
decode step (CUDA events over repeated replays); host time of the step's bookkeeping (prepare / finish); and,
with ``--profile``, a torch.profiler table of one eager decode step's kernels (count and time by name).

    python scripts/gpu_profile_decode.py --contexts 4k,64k [--profile] [--kv SPEC]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from longctx.bench.sweep import random_model, shape_config
from longctx.engine import fast_decode, runner
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.model.loader import LoadedModel

FIRST_STEP_PROFILE = False
HOST: dict[str, float] = {"prepare": 0.0, "finish": 0.0, "steps": 0, "first": 0.0}


def _wrap_host_timers() -> None:
    prepare = fast_decode.prepare_decode
    finish = fast_decode.FastDecodeContext.finish

    def timed_prepare(*a, **k):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        if not HOST["steps"] and FIRST_STEP_PROFILE:
            import cProfile  # noqa: PLC0415
            import pstats  # noqa: PLC0415

            prof = cProfile.Profile()
            out = prof.runcall(prepare, *a, **k)
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        else:
            out = prepare(*a, **k)
        if not HOST["steps"]:
            HOST["first"] = time.perf_counter() - t
        HOST["prepare"] += time.perf_counter() - t
        HOST["steps"] += 1
        return out

    def timed_finish(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        t = time.perf_counter()
        out = finish(self, *a, **k)
        HOST["finish"] += time.perf_counter() - t
        return out

    runner.prepare_decode = timed_prepare
    fast_decode.FastDecodeContext.finish = timed_finish


SYNCED: dict[str, float] = {}


def _wrap_synced(llm: LLM) -> None:
    """Time each phase of a decode step with a device synchronisation on both sides (attribution, not speed)."""
    from longctx.engine import (
        cuda_graph,  # noqa: PLC0415
        llm_engine,  # noqa: PLC0415
    )

    def timed(name, fn):  # noqa: ANN001, ANN202
        def inner(*a, **k):  # noqa: ANN002, ANN003, ANN202
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            SYNCED[name] = SYNCED.get(name, 0.0) + time.perf_counter() - t
            return out
        return inner

    runner.prepare_decode = timed("prepare_decode", runner.prepare_decode)
    fast_decode.FastDecodeContext.finish = timed("finish", fast_decode.FastDecodeContext.finish)
    cuda_graph.DecodeGraphs.run = timed("graph run (copies + replay)", cuda_graph.DecodeGraphs.run)
    llm_engine.sample_batch = timed("sample", llm_engine.sample_batch)
    llm.runner._run_fast_decode = timed("whole fast step", llm.runner._run_fast_decode)


def _ctx(text: str) -> int:
    text = text.lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4k,64k")
    ap.add_argument("--kv", default="full")
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--host-profile", action="store_true", help="cProfile of one generate (host side)")
    ap.add_argument("--first-step-profile", action="store_true",
                    help="cProfile of the first decode step's host preparation after the measured prefill")
    ap.add_argument("--prefill-profile", action="store_true", help="kernel table of one prefill")
    ap.add_argument("--synced", action="store_true",
                    help="synchronise around each phase of a decode step and print where the step's time goes")
    args = ap.parse_args()
    contexts = [_ctx(c) for c in args.contexts.split(",")]
    cfg = shape_config(args.shape, max(contexts) + args.new_tokens + 64)
    model = random_model(cfg, "cuda", torch.bfloat16)
    llm = LLM(LoadedModel(model, cfg, None, Path("<random>")), device="cuda", dtype=torch.bfloat16,
              max_kv_bytes=20 << 30, preallocate_kv=True)
    global FIRST_STEP_PROFILE  # noqa: PLW0603
    _wrap_host_timers()
    if args.synced:
        _wrap_synced(llm)
    for context in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (context,)).tolist()
        llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True), kv=args.kv)
        HOST.update(prepare=0.0, finish=0.0, steps=0, first=0.0)
        FIRST_STEP_PROFILE = args.first_step_profile
        SYNCED.clear()
        torch.cuda.synchronize()
        out = llm.generate(prompt, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), kv=args.kv)[0]
        steps = max(HOST["steps"], 1)
        line = (f"ctx {context:>6} {args.kv}: TPOT {out.stats.time_per_output_token * 1e3:7.2f} ms  "
                f"host prepare {HOST['prepare'] / steps * 1e3:5.2f} ms (first step {HOST['first'] * 1e3:.1f} ms, "
                f"later {(HOST['prepare'] - HOST['first']) / max(steps - 1, 1) * 1e3:.2f}) "
                f"finish {HOST['finish'] / steps * 1e3:5.2f} ms")
        graphs = llm.runner.graphs
        if graphs is not None and graphs.graphs:
            g = list(graphs.graphs.values())[-1]
            g.graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                g.graph.replay()
            end.record()
            torch.cuda.synchronize()
            line += f"  graph replay {start.elapsed_time(end) / 20:6.2f} ms (GPU)"
        print(line, flush=True)
        if SYNCED:
            for name, total in SYNCED.items():
                print(f"    synced {name:<30} {total / steps * 1e3:7.2f} ms/step")
            SYNCED.clear()
        if args.host_profile:
            import cProfile  # noqa: PLC0415
            import pstats  # noqa: PLC0415

            prof = cProfile.Profile()
            prof.enable()
            llm.generate(prompt, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), kv=args.kv)
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        if args.prefill_profile:
            _profile_prefill(llm, prompt, args.kv)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

            saved, llm.runner.graphs = llm.runner.graphs, None
            plain = llm.runner._run_fast_decode
            profiles = []

            def profiled(scheduled, plain=plain, profiles=profiles):  # noqa: ANN001, ANN202
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    out = plain(scheduled)
                    torch.cuda.synchronize()
                profiles.append(prof)
                return out

            llm.runner._run_fast_decode = profiled
            llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True), kv=args.kv)
            llm.runner._run_fast_decode, llm.runner.graphs = plain, saved
            rows = [e for e in profiles[-1].key_averages() if e.device_type.name == "CUDA"]
            rows.sort(key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in rows)
            print(f"  one eager decode step: {sum(e.count for e in rows)} kernels, {total / 1e3:.2f} ms of kernel time")
            for e in rows[:25]:
                print(f"    {e.count:>6} x {e.device_time_total / max(e.count, 1):8.2f} us = "
                      f"{e.device_time_total / 1e3:8.3f} ms  {e.key[:100]}")

def _profile_prefill(llm: LLM, prompt: list[int], kv: str) -> None:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True), kv=kv)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels = [e for e in rows if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels)
    print(f"  prefill of {len(prompt)} tokens ({kv}): wall {wall * 1e3:.0f} ms (profiled), "
          f"{sum(e.count for e in kernels)} kernels, {total / 1e3:.1f} ms of kernel time")
    for e in kernels[:22]:
        print(f"    {e.count:>6} x {e.device_time_total / max(e.count, 1):9.1f} us = "
              f"{e.device_time_total / 1e3:8.2f} ms  {e.key[:100]}")


if __name__ == "__main__":
    main()
