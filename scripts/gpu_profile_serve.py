"""Where a serving step's time goes on the GPU: the engine loop over many long prompts (8B shape, random bf16
weights), each step timed with a device synchronisation and classed by what it carried.

    python scripts/gpu_profile_serve.py [--kv SPEC] [--requests 32] [--prompt-len 4096] [--output-len 64]
        [--kv-memory 64] [--max-num-batched-tokens 8192] [--profile-steps 3] [--top 25]

Prints, per kind of step (prefill only, mixed prefill + decode, decode only): steps, mean ms, prefill tokens
per second, decode rows, and the prefill rate as a fraction of the matrix-unit floor (2 x parameters FLOPs
per token at the H200's dense bf16 rate); then, with ``--profile-steps N``, a torch.profiler table of the
first N steps that carry prefill chunks (kernels by GPU time, and host ops by CPU time). Attribution, not a
benchmark: the synchronisation around every step removes the overlap the engine normally has.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

from longctx.bench.sweep import random_model, shape_config
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.model.loader import LoadedModel

H200_BF16_DENSE = 989e12  # FLOP/s


@contextlib.contextmanager
def _sync_callers(counts: Counter[str]):  # noqa: ANN202
    """Count, by their innermost longctx caller, the operations that synchronise with the GPU inside."""
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202, ARG001
        frames = [f for f in traceback.extract_stack()[:-1] if "longctx" in f.filename and "scripts" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-1:-4:-1]) or filename
        counts[where] += 1

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", default="full")
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--kv-memory", type=float, default=64.0, help="GiB")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    ap.add_argument("--sync-debug", type=int, default=0, metavar="N",
                    help="report where the first N prefill-carrying steps synchronise with the GPU (by caller)")
    ap.add_argument("--decode-host-profile", type=int, default=0, metavar="N",
                    help="cProfile (host, by own time) of N decode-only steps, after the prompts are in")
    ap.add_argument("--no-cudnn", action="store_true", help="disable cuDNN attention (comparison)")
    args = ap.parse_args()
    dev = args.device
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    cfg = shape_config(args.shape, args.prompt_len + args.output_len + 64)
    model = random_model(cfg, dev, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    llm = LLM(LoadedModel(model, cfg, None, Path("<random>")), device=dev, dtype=torch.bfloat16,
              max_kv_bytes=int(args.kv_memory * (1 << 30)), preallocate_kv=dev.startswith("cuda"),
              max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(0, cfg.vocab_size, (512,), generator=g).tolist()
    llm.generate([warm, warm], SamplingParams(max_tokens=4, ignore_eos=True), kv=args.kv)  # compile / capture

    steps: list[tuple[int, int, float]] = []  # (prefill tokens, decode rows, seconds)
    forward = engine._forward
    profiled: list[int] = []
    prof = None
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    syncs: Counter[str] = Counter()
    decode_prof: list[cProfile.Profile] = []
    debugged = [0]

    def timed(scheduled):  # noqa: ANN001, ANN202
        pre = sum(n for r, n in scheduled if r.is_prefill)
        dec = sum(1 for r, _ in scheduled if not r.is_prefill)
        if not pre and len(decode_prof) < args.decode_host_profile:
            cp = cProfile.Profile()
            out = cp.runcall(forward, scheduled)
            sync()
            decode_prof.append(cp)
            return out
        if pre and debugged[0] < args.sync_debug:
            debugged[0] += 1
            with _sync_callers(syncs):
                return forward(scheduled)
        on = prof is not None and pre and len(profiled) < args.profile_steps
        if on and not profiled:
            prof.__enter__()  # type: ignore[union-attr]
        sync()
        t = time.perf_counter()
        out = forward(scheduled)
        sync()
        steps.append((pre, dec, time.perf_counter() - t))
        if on:
            profiled.append(len(steps))
            if len(profiled) == args.profile_steps:
                prof.__exit__(None, None, None)  # type: ignore[union-attr]
        return out

    engine._forward = timed  # type: ignore[method-assign]
    for _ in range(args.requests):
        engine.add_request(torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist(), sp,
                           kv=args.kv, stream=False)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - t0
    kinds: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for pre, dec, sec in steps:
        kinds["prefill only" if pre and not dec else "mixed" if pre else "decode only"].append((pre, dec, sec))
    total_pre = sum(s[0] for s in steps)
    print(f"{args.kv}: {args.requests} x {args.prompt_len} prompt tokens, {args.output_len} out, "
          f"{len(steps)} steps in {wall:.2f} s ({sum(s[2] for s in steps):.2f} s in forwards); "
          f"{params / 1e9:.2f} B parameters")
    floor = 2 * params / H200_BF16_DENSE  # seconds of matrix work per token
    for kind, rows in kinds.items():
        sec = sum(r[2] for r in rows)
        pre = sum(r[0] for r in rows)
        dec = sum(r[1] for r in rows)
        line = f"  {kind:<13} {len(rows):5d} steps  {sec / len(rows) * 1e3:8.2f} ms/step  rows {dec / len(rows):6.1f}"
        if pre:
            line += (f"  prefill {pre / len(rows):7.0f} tok/step  {pre / sec:9.0f} tok/s  "
                     f"(matrix floor {floor * (pre + dec) / sec:5.1%} busy)")
        print(line)
    tokens = total_pre + sum(s[1] for s in steps)
    print(f"  prompt tokens {total_pre}, decode rows {tokens - total_pre}: "
          f"whole-run matrix floor {floor * tokens:.2f} s")
    if decode_prof:
        print(f"host profile of {len(decode_prof)} decode-only steps:")
        stats = pstats.Stats(decode_prof[0])
        for cp in decode_prof[1:]:
            stats.add(cp)
        stats.sort_stats("tottime").print_stats(args.top)
    if syncs:
        print(f"synchronisations in {debugged[0]} prefill-carrying steps, by caller:")
        for where, count in syncs.most_common(args.top):
            print(f"  {count:6d}  {where}")
    if prof is not None and profiled:
        print(f"profiled steps {profiled}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top // 2))


if __name__ == "__main__":
    main()
