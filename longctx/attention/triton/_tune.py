"""Temporary tuning sweep (not part of the package)."""
import itertools
import sys
import time

import torch
from triton.testing import do_bench

import longctx.attention.triton.paged_decode as pd
from longctx.attention.triton.check import Case, make_inputs, run_all

t0 = time.time()
res = run_all()
for name, ok, detail in res:
    print(("PASS " if ok else "FAIL ") + name + ": " + detail)
print(f"run_all {time.time() - t0:.0f}s", flush=True)

x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
ms = do_bench(lambda: x.clone(), return_mode="median")
print(f"copy bw {2 * x.numel() * 2 / ms / 1e6:.0f} GB/s")
del x

mode = sys.argv[1] if len(sys.argv) > 1 else "cfg"
orig = pd._launch_config
for bs in (16, 64):
    for n in (4096, 16384, 131072):
        case = Case(1, 8, 4, 128, bs, torch.bfloat16, max_len=n, lengths=(n,) * 8)
        a = make_inputs(case, torch.Generator().manual_seed(n))
        out = torch.empty_like(a["q"])
        kvb = 2 * 8 * n * 128 * 2
        rows = []
        for bn, nw, ns in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
            pd._launch_config = lambda dt, d, c=(bn, nw, ns): c
            for pps in (2, 4, 8):
                pd.PROGRAMS_PER_SM = pps
                try:
                    ms = do_bench(lambda: pd.paged_decode_attention(*a.values(), 0.088, out=out), warmup=10, rep=40,
                                  return_mode="median")
                except Exception as e:  # noqa: BLE001
                    print("err", bn, nw, ns, type(e).__name__)
                    continue
                rows.append((kvb / ms / 1e6, bn, nw, ns, pps, ms * 1e3))
        rows.sort(reverse=True)
        print(f"bs={bs} n={n}: best " + " | ".join(f"{r[0]:.0f}GB/s bn{r[1]} w{r[2]} s{r[3]} pps{r[4]} {r[5]:.1f}us"
                                                for r in rows[:4]))
        dflt = [r for r in rows if (r[1], r[2], r[3], r[4]) == (*orig(torch.bfloat16, 128), 4)]
        print(f"   default {dflt[0][0]:.0f} GB/s" if dflt else "   default missing", flush=True)
        pd._launch_config = orig
        pd.PROGRAMS_PER_SM = 4
