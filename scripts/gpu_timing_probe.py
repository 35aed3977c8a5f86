"""Quick probe: how long SmolLM2 needle prompts take on this device with the current engine (for sweep planning)."""

from __future__ import annotations

import sys
import time

import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.eval.needle import build_needle_prompt

path = sys.argv[1]
llm = LLM(path, device="cuda", dtype="bf16")
for n in (1024, 4096, 8192):
    p = build_needle_prompt(llm.tokenizer, n, 0.5)
    for spec, batch in (("full", 1), ("full", 16), ("snapkv:256", 16), ("h2o:256", 4)):
        torch.cuda.synchronize()
        t = time.time()
        outs = llm.generate([p.text] * batch, SamplingParams(max_tokens=16), kv=spec, chat=True, share_prefix=False)
        torch.cuda.synchronize()
        ok = sum("saffron" in o.text.lower() for o in outs)
        print(f"{n:>5} {spec:<12} batch {batch:>2}: {time.time() - t:6.2f} s  right {ok}/{batch}  "
              f"tpot {outs[0].stats.time_per_output_token * 1000:.1f} ms", flush=True)
