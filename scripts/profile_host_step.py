"""Host work per engine step, on the CPU: a model with the 8B shape's layer and head counts (32 layers, 32 query /
8 KV heads) but tiny matrices, so the step's compute is negligible and what is left is Python bookkeeping.

    python scripts/profile_host_step.py [--batch 64] [--context 512] [--steps 40] [--kv SPEC] [--profile]

Prints the mean wall time per decode step (the engine's host work plus tiny CPU kernels); ``--profile`` adds
the top functions by cumulative time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longctx.bench.sweep import random_model  # noqa: E402
from longctx.engine.llm import LLM  # noqa: E402
from longctx.engine.sampling import SamplingParams  # noqa: E402
from longctx.model.config import ModelConfig, RopeConfig  # noqa: E402
from longctx.model.loader import LoadedModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kv", default="full")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sort", default="cumulative", help="cProfile sort key (cumulative, tottime)")
    ap.add_argument("--top", type=int, default=30, help="how many functions the profile lists")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(model_type="llama", vocab_size=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      max_position_embeddings=max(8192, args.context + args.steps + 64),
                      rope=RopeConfig(theta=500000.0),
                      layer_types=("full_attention",) * 32, hidden_size=64, intermediate_size=64, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=2)
    model = random_model(cfg, "cpu", torch.float32)
    llm = LLM(LoadedModel(model, cfg, None, Path("<host profile>")), max_num_seqs=args.batch,
              max_kv_bytes=4 << 30)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batch):
        eng.add_request(torch.randint(0, 256, (args.context,), generator=g).tolist(),
                        SamplingParams(max_tokens=args.steps + 50, ignore_eos=True), kv=args.kv, stream=False)
    while any(r.is_prefill for r in eng.requests.values()):
        eng.step()
    for _ in range(5):
        eng.step()
    prof = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(args.steps):
        eng.step()
    if prof:
        prof.disable()
    dt = (time.perf_counter() - t) / args.steps
    print(f"batch {args.batch}, kv {args.kv}: {dt * 1e3:.2f} ms per decode step ({dt / args.batch * 1e6:.1f} us per "
          f"sequence)")
    if prof:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.step()


if __name__ == "__main__":
    main()
