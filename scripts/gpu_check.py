"""GPU correctness check: every GPU path against the CPU reference. Run on the GPU machine:

    python scripts/gpu_check.py [--smollm2 PATH.gguf] [--skip-tiny] [--select-only | --heads-only] [--device cpu]

1. Engine end to end on CUDA (fp32) vs CPU: tiny random checkpoints of every architecture and several
   KV specs — prompt logits close and greedy tokens identical; the real SmolLM2 if given.
2. Triton kernels against their torch reference twins: the fused decoder ops (``longctx.ops``) and paged
   decode attention (``longctx.attention.triton``).
3. The serving engine on CUDA: mixed prefill + decode steps vs the per-sequence path, preemption vs an
   uninterrupted run.
4. Head budgets (duo, razor, headkv) on every tiny architecture, from a synthetic head-score file (half the
   kv-heads retrieval, ``longctx.heads.synthetic``) bound to that checkpoint: CUDA vs CPU tokens, batched vs
   per-sequence decode (``--heads-only`` runs just these); DuoAttention's calibration contexts (fused SDPA on
   CUDA, fp32 and bf16 autocast) against the eager CPU reference, and a short calibration CUDA vs CPU.
5. Prompt chunks attended in place by the varlen paged prefill kernel (``LONGCTX_PAGED_PREFILL=1``) against the
   gathered path on the device; the kernel's own cases are in ``attention/triton/check_prefill.py`` (2.).
Prints one line per check and a final table; exits 1 if anything failed. ``--device cpu`` is a dry run without a
GPU: the "GPU" side of the engine checks runs on the CPU too (the code paths, not the kernels; the kernel checks
are skipped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longctx.engine.llm import LLM  # noqa: E402
from longctx.engine.sampling import SamplingParams  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []
DEVICE = "cuda"  # the side under test; --device cpu: a dry run of the engine checks without a GPU
SELECT_SPECS = ["quest(tokens=32,dense_layers=0)", "sparq(tokens=32)", "tokenselect(tokens=32)",
                "tidaldecode(tokens=32)", "recycled(tokens=32)", "lsh_sampling"]


def record(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def guarded(name: str, check: Any, *args: Any) -> None:
    """Run ``check``; an exception is recorded as that check's failure (the rest of the run goes on)."""
    try:
        check(*args)
    except Exception as e:  # noqa: BLE001
        record(name, False, f"raised {type(e).__name__}: {e}")


def check_engine(path: Path, name: str, specs: list[str], prompt_len: int, vocab: int, new_tokens: int = 20,
                 tol: float = 1e-3) -> None:
    cpu, gpu = LLM(path, device="cpu"), LLM(path, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (prompt_len, prompt_len // 2 + 3)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for spec in specs:
        lc, lg = cpu.prompt_logits(prompts[0], kv=spec), gpu.prompt_logits(prompts[0], kv=spec).cpu()
        diff = (lc - lg).abs().max().item()
        tc = [o.token_ids for o in cpu.generate(prompts, params, kv=spec)]
        tg = [o.token_ids for o in gpu.generate(prompts, params, kv=spec)]
        ok = diff < tol and tc == tg
        record(f"engine {name} [{spec}]", ok, f"max logit diff {diff:.2e}, tokens equal {tc == tg}")


def check_fast_vs_slow(path: Path, name: str, specs: list[str], prompt_len: int, vocab: int,
                       new_tokens: int = 24) -> None:
    """On CUDA, the batched decode path (Triton kernels, CUDA graphs) against the per-sequence path on the same
    device: the same quantized codes, so greedy tokens must be identical."""
    llm = LLM(path, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (prompt_len, prompt_len // 2 + 5)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for spec in specs:
        fast = [o.token_ids for o in llm.generate(prompts, params, kv=spec)]
        llm.runner.fast_decode = False
        slow = [o.token_ids for o in llm.generate(prompts, params, kv=spec)]
        llm.runner.fast_decode = True
        record(f"fast vs per-sequence decode {name} [{spec}]", fast == slow, f"tokens equal {fast == slow}")


def _run_staggered(llm: LLM, prompts: list[list[int]], spec: str, new_tokens: int) -> list[list[int]]:
    """Requests added one engine step apart: most steps mix a prompt chunk with decoding rows."""
    eng, ids, done = llm.engine, [], {}
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        ids.append(eng.add_request(p, params, kv=spec, stream=False))
        done.update((o.request_id, o.token_ids) for o in eng.step())
    while eng.has_unfinished_requests():
        done.update((o.request_id, o.token_ids) for o in eng.step())
    return [done[r] for r in ids]


def check_engine_loop(path: Path, name: str, specs: list[str], vocab: int, new_tokens: int = 16) -> None:
    """The serving engine on CUDA: mixed steps (decode rows on the batched Triton path beside prompt chunks)
    equal the per-sequence path, and preemption + recompute on a pool too small for the batch equals an
    uninterrupted run (greedy tokens identical), with every block free afterwards."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (70, 41, 93, 55, 64, 38)]
    for spec in specs:
        llm = LLM(path, device="cuda", max_num_batched_tokens=48)
        mixed = _run_staggered(llm, prompts, spec, new_tokens)
        llm.runner.fast_decode = False
        slow = _run_staggered(llm, prompts, spec, new_tokens)
        record(f"engine mixed steps vs per-sequence {name} [{spec}]", mixed == slow, f"tokens equal {mixed == slow}")
        if "quant" in spec:
            continue  # the quantized pool shares the fp pool's byte budget: a pool this small leaves it none
        blocks = 2 * llm.config.num_layers * llm.config.num_kv_heads * 8  # a few prompts' worth
        small = LLM(path, device="cuda", max_kv_bytes=blocks * llm.pool.bytes_per_block)
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        tight = [o.token_ids for o in small.generate(prompts, params, kv=spec)]
        preempted = small.engine.stats().preempted
        # an evicting spec commits its bounded peak at admission and is never preempted; full grows and is
        ok = tight == mixed and (preempted > 0) == (spec == "full") and small.pool.num_used_blocks == 0
        record(f"engine preemption {name} [{spec}]", ok,
               f"{preempted} preemptions, tokens equal {tight == mixed}, blocks left {small.pool.num_used_blocks}")


def check_graph_buckets(path: Path, name: str, specs: list[str], vocab: int) -> None:
    """Decode batches of every size from 7 down to 1 (requests of different lengths finish one by one) run in
    the CUDA graphs of their batch buckets (padding rows): greedy tokens equal the eager batched step, and
    only bucket sizes were captured."""
    from longctx.engine.cuda_graph import graph_batch  # noqa: PLC0415

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (33, 50, 41, 62, 29, 57, 45)]
    for spec in specs:
        runs = []
        for graphs in (True, False):
            llm = LLM(path, device="cuda", preallocate_kv=True, max_kv_bytes=64 << 20)
            if not graphs:
                llm.runner.graphs = None
            eng, ids, done = llm.engine, [], {}
            for i, p in enumerate(prompts):
                ids.append(eng.add_request(p, SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True), kv=spec,
                                           stream=False))
            while eng.has_unfinished_requests():
                done.update((o.request_id, o.token_ids) for o in eng.step())
            runs.append(([done[r] for r in ids], llm))
        (padded, llm), (eager, _) = runs
        sizes = sorted({key[0] for key in llm.runner.graphs.graphs}) if llm.runner.graphs is not None else []
        ok = padded == eager and bool(sizes) and all(graph_batch(b) == b for b in sizes)
        record(f"graph batch buckets {name} [{spec}]", ok, f"tokens equal {padded == eager}, captured sizes {sizes}")


def head_specs(heads: Path) -> list[str]:
    """duo (evicting every step and with a slack), razor (compensation slot), headkv (score-split budgets)."""
    return [f"budget=duo(heads={heads},sinks=4,window=16)", f"budget=duo(heads={heads},sinks=4,window=16,slack=8)",
            f"budget=razor(heads={heads},sinks=4,window=16,threshold=0.5)",
            f"retain=snapkv budget=headkv(heads={heads},tokens=24)"]


def check_head_budgets(folder: Path, arch: str) -> None:
    """duo / razor / headkv on one tiny checkpoint, from a synthetic file (half the kv-heads retrieval) bound to
    it: CUDA vs CPU (logits and greedy tokens), and the batched decode path vs the per-sequence one."""
    from longctx.heads.synthetic import write_for_checkpoint  # noqa: PLC0415

    heads = write_for_checkpoint(folder, folder.parent / f"{arch}-synthetic-heads.json", fraction=0.5, seed=0)
    specs = head_specs(heads)
    check_engine(folder, arch, specs, 60, 256, tol=1e-4)
    check_fast_vs_slow(folder, arch, specs, 60, 256, new_tokens=32)


def check_calibration_contexts(folder: Path, arch: str) -> None:
    """DuoAttention's training contexts: the fused SDPA path on CUDA (fp32, and under bf16 autocast) vs the eager
    reference (mixed probabilities) on the CPU: outputs and the gates' gradient; and a short calibration."""
    import os  # noqa: PLC0415
    from dataclasses import replace  # noqa: PLC0415

    from longctx.heads.contexts import GatedContext  # noqa: PLC0415
    from longctx.heads.duo import DuoSettings, calibrate  # noqa: PLC0415

    cpu, gpu = LLM(folder, device="cpu"), LLM(folder, device=DEVICE)
    cfg, n = cpu.config, 60
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    init = torch.rand(cfg.num_layers, cfg.num_kv_heads, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(4))  # not flat in the gates

    def run(llm: LLM, reference: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        os.environ["LONGCTX_ATTENTION"] = "reference" if reference else ""
        dev = torch.device(llm.device)
        gates = init.clone().to(dev).requires_grad_(True)
        with torch.enable_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = llm.model(ids.to(dev), GatedContext(cfg, n, dev, gates, 2, 8))
            (hidden.float() * probe.to(dev)).sum().backward()
        os.environ["LONGCTX_ATTENTION"] = ""
        return hidden.detach().float().cpu(), gates.grad.cpu()

    ref_out, ref_grad = run(cpu, True, False)
    for bf16, tol in ((False, 1e-4), (True, 5e-2)):
        out, grad = run(gpu, False, bf16)
        d_out = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
        d_grad = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        record(f"duo calibration context {arch} [{'bf16' if bf16 else 'fp32'}]", d_out < tol and d_grad < 10 * tol,
               f"relative max diff: output {d_out:.1e}, gate gradient {d_grad:.1e} (tol {tol:.0e} / {10 * tol:.0e})")
    tiny = DuoSettings(steps=6, sinks=2, window=8, min_length=80, max_length=80, num_passkeys=2, passkey_digits=3,
                       seed=3, precision="fp32")
    a = calibrate(cpu.model, cpu.tokenizer, tiny)
    b = calibrate(gpu.model, gpu.tokenizer, tiny)
    c = calibrate(gpu.model, gpu.tokenizer, replace(tiny, precision="bf16"))
    d_gates = (a.gates - b.gates).abs().max().item()
    record(f"duo calibration {arch} [cuda fp32 vs cpu]", d_gates < 1e-3 and c.precision == "bf16" and all(
        x == x for x in c.losses), f"max gate diff {d_gates:.1e} after {tiny.steps} steps; bf16 losses "
           f"{c.losses[0]:.3f} -> {c.losses[-1]:.3f}")


def check_paged_prefill(folder: Path, arch: str, specs: list[str], vocab: int = 256) -> None:
    """Prompt chunks attended in place (``LONGCTX_PAGED_PREFILL=1``: the varlen paged prefill kernel) against
    the gathered path, both on the device: chunked prompts (several sequences per step, cached prefixes), greedy
    tokens equal and prompt logits close."""
    import os  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (57, 41, 66, 33)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for spec in specs:
        runs = []
        for paged in (False, True):
            os.environ["LONGCTX_PAGED_PREFILL"] = "1" if paged else ""
            llm = LLM(folder, device=DEVICE, max_num_batched_tokens=24)
            runs.append(([o.token_ids for o in llm.generate(prompts, params, kv=spec)],
                         llm.prompt_logits(prompts[2], kv=spec).cpu()))
        os.environ["LONGCTX_PAGED_PREFILL"] = ""
        (t0, l0), (t1, l1) = runs
        diff = (l0 - l1).abs().max().item()
        record(f"paged prefill {arch} [{spec}]", t0 == t1 and diff < 1e-3,
               f"tokens equal {t0 == t1}, max logit diff {diff:.2e} (in place vs gathered)")


def main() -> int:
    global DEVICE
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", type=Path)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--select-only", action="store_true", help="only the select axis (engine on tiny llama + kernels)")
    ap.add_argument("--heads-only", action="store_true",
                    help="only the head budgets (duo, razor, headkv) on every tiny architecture")
    ap.add_argument("--device", default="cuda", help="the side under test (default cuda); cpu: a dry run without a "
                    "GPU (engine checks CPU vs CPU, kernel checks skipped)")
    args = ap.parse_args()
    DEVICE = args.device
    if DEVICE.startswith("cuda"):
        print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name()}")
    else:
        print(f"torch {torch.__version__}, DRY RUN on {DEVICE}: engine code paths only, no GPU kernels")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.time()
    if args.heads_only:
        from tests.tiny import ARCHS, make_tiny  # noqa: PLC0415

        tmp = Path(tempfile.mkdtemp())
        for arch in ARCHS:
            folder, _ = make_tiny(arch, tmp / arch)
            check_head_budgets(folder, arch)
            if arch in ("llama", "gemma3", "mistral"):
                guarded(f"duo calibration {arch}", check_calibration_contexts, folder, arch)
        return _summary(start)
    if not DEVICE.startswith("cuda"):
        raise SystemExit("--device cpu: only with --heads-only (the other checks exercise CUDA kernels)")
    if args.select_only:
        from tests.tiny import make_tiny  # noqa: PLC0415

        folder, _ = make_tiny("llama", Path(tempfile.mkdtemp()) / "llama")
        select = [f"select={m}" for m in SELECT_SPECS] + [f"snapkv:40 select={SELECT_SPECS[0]}"]
        check_engine(folder, "llama", select, 60, 256, tol=1e-4)
        check_fast_vs_slow(folder, "llama", select, 60, 256)
        check_graph_buckets(folder, "llama", ["full", "snapkv:24"], 256)
        _select_kernels()
        return _summary(start)
    if not args.skip_tiny:
        from tests.tiny import ARCHS, make_tiny  # noqa: PLC0415

        tmp = Path(tempfile.mkdtemp())
        for arch in ARCHS:
            folder, _ = make_tiny(arch, tmp / arch)
            specs = ["full", "snapkv:24", "h2o:24", "streamingllm:20 positions=rerotate", "int8"] if arch in (
                "llama", "gemma3") else ["full"]
            check_engine(folder, arch, specs, 60, 256, tol=1e-4)
            if arch in ("gemma3", "mistral", "qwen2"):  # sliding windows on the batched path (kernel starts)
                check_fast_vs_slow(folder, arch, ["full", "snapkv:24", "streamingllm:20"], 60, 256, new_tokens=48)
            if arch == "llama":  # quantized prefixes that really fill up (small groups and residual)
                quant = ["quant=int8(group=16,residual=16)", "quant=int4(group=16,residual=8)",
                         "snapkv:40 quant=int8(group=16,residual=16)"]
                check_engine(folder, arch, quant, 60, 256, tol=2e-2)
                check_fast_vs_slow(folder, arch, ["full", "snapkv:24"] + quant, 60, 256)
                check_engine_loop(folder, arch, ["full", "snapkv:24", "streamingllm:20",
                                                 "quant=int8(group=16,residual=16)"], 256)
                check_graph_buckets(folder, arch, ["full", "snapkv:24", "streamingllm:20"], 256)
                # retain methods added since the last GPU run, and the select axis on the batched step
                check_engine(folder, arch, ["retain=kvzip budget=uniform(tokens=24)", "hashevict:24", "d2o:24"],
                             60, 256, tol=1e-4)
                select = [f"select={m}" for m in SELECT_SPECS] + [f"snapkv:40 select={SELECT_SPECS[0]}"]
                check_engine(folder, arch, select, 60, 256, tol=1e-4)
                check_fast_vs_slow(folder, arch, select, 60, 256)
            check_head_budgets(folder, arch)  # duo / razor / headkv from a synthetic head file for this checkpoint
            if arch in ("llama", "gemma3", "mistral"):  # plain, mixed sliding/full layers, sliding everywhere
                guarded(f"duo calibration {arch}", check_calibration_contexts, folder, arch)
            if arch in ("llama", "gemma3", "qwen3"):
                guarded(f"paged prefill {arch}", check_paged_prefill, folder, arch, ["full", "snapkv:24"])
    if args.smollm2:
        check_engine(args.smollm2, "smollm2", ["full", "snapkv:128"], 600, 49152, new_tokens=24, tol=2e-3)
    from longctx.ops import check as ops_check  # noqa: PLC0415

    for name, ok, detail in ops_check.run_all():
        record(name, ok, detail)
    try:
        from longctx.attention.triton import check as triton_check  # noqa: PLC0415
    except ImportError as e:
        print(f"(no triton kernels to check: {e})")
    else:
        for name, ok, detail in triton_check.run_all():
            record(name, ok, detail)
    _select_kernels()
    return _summary(start)


def _select_kernels() -> None:
    from longctx.kv.select import check as select_check  # noqa: PLC0415

    for name, ok, detail in select_check.run_all():
        record(name, ok, detail)


def _summary(start: float) -> int:
    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.time() - start:.0f} s")
    for name, _, detail in failed:
        print(f"FAILED {name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
