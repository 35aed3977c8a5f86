import time, torch, cProfile, pstats
import longctx.attention.triton.paged_decode as pd
from longctx.attention.triton.check import Case, make_inputs
a = make_inputs(Case(1, 8, 4, 128, 16, torch.bfloat16, max_len=4096, lengths=(4096,) * 8), torch.Generator().manual_seed(0))
out = torch.empty_like(a["q"])
args = list(a.values())
def loop(fn, n=2000):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
print("full call us", loop(lambda: pd.paged_decode_attention(*args, 0.088, out=out)))
print("checks us", loop(lambda: (pd._check_shapes(*args, None, None, None), pd._check_kernel_args(*args, None, None, out))))
print("devctx us", loop(lambda: torch.cuda.device(a["q"].device).__enter__()))
print("empty x2 us", loop(lambda: (torch.empty(1, 32, 16, 128, device="cuda"), torch.empty(1, 32, 16, device="cuda"))))
pr = cProfile.Profile(); pr.enable()
for _ in range(500): pd.paged_decode_attention(*args, 0.088, out=out)
pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(12)
