"""GPU check: every Triton kernel against its torch reference, plus timings. ``scripts/gpu_check.py`` prints it.

Each case draws fresh random inputs (never zeros): a pool whose blocks are handed to rows in shuffled order,
garbage in every table entry a row does not own, ragged lengths including 0, 1 and block boundaries. The
oracle is the reference run on fp64 copies of the inputs; the kernel's output buffer is filled with NaN before
the launch, so an element it fails to write shows. Error is ||out - ref|| / ||ref|| over the whole output.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.triton.paged_decode import paged_decode_attention, paged_decode_attention_ref

Result = tuple[str, bool, str]
# fp32 runs tl.dot in "ieee" mode (no tf32); the ref is fp64, so only fp32 rounding remains.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    batch: int
    num_kv_heads: int
    group: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    max_len: int = 1500
    lengths: tuple[int, ...] | None = None  # [B * Hkv] row-major; default: ragged with edge values, then random
    softcap: float | None = None
    selected: bool = False
    num_splits: int | None = None
    max_seqlen_k: int | None = None  # the launch's hint (may be too small on purpose)
    windowed: bool = False  # per-row ``starts`` (a sliding window's first visible token), 0 to past the length

    @property
    def name(self) -> str:
        extra = "".join([f" softcap={self.softcap}" if self.softcap else "", " selected" if self.selected else "",
                         f" splits={self.num_splits}" if self.num_splits else "",
                         f" max_seqlen_k={self.max_seqlen_k}" if self.max_seqlen_k else "",
                         " windowed" if self.windowed else ""])
        return (f"paged_decode {DTYPE_NAMES[self.dtype]} B={self.batch} Hkv={self.num_kv_heads} G={self.group} "
                f"D={self.head_dim} bs={self.block_size} max_len={self.max_len}{extra}")


def _lengths(case: Case, gen: torch.Generator) -> Tensor:
    rows = case.batch * case.num_kv_heads
    if case.lengths is not None:
        return torch.tensor(case.lengths, dtype=torch.int32).view(case.batch, case.num_kv_heads)
    bs = case.block_size
    edge = [case.max_len, 0, 1, bs, bs + 1, bs - 1, 2 * bs]  # the longest first: a 1-row case is not empty
    vals = torch.randint(1, case.max_len + 1, (rows,), generator=gen)
    vals[: min(rows, len(edge))] = torch.tensor(edge[:rows])
    return vals[torch.randperm(rows, generator=gen)].to(torch.int32).view(case.batch, case.num_kv_heads)


def make_inputs(case: Case, gen: torch.Generator, device: str = "cuda") -> dict[str, Tensor]:
    """Random kernel arguments for ``case`` (built on the CPU with ``gen``, then moved to ``device``)."""
    b, hkv, d, bs = case.batch, case.num_kv_heads, case.head_dim, case.block_size
    lengths = _lengths(case, gen)
    nblocks = (lengths.long() + bs - 1) // bs  # [B, Hkv]
    width = max(int(nblocks.max()), 1)
    num_blocks = int(nblocks.sum()) + 1 + 7  # + null block + spare blocks nobody owns
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # shuffled: rows get scattered blocks
    tables = torch.randint(0, num_blocks, (b, hkv, width), generator=gen, dtype=torch.int32)  # garbage tails
    for r, n in enumerate(nblocks.view(-1).tolist()):
        tables.view(-1, width)[r, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        del ids[:n]
    args = {
        "q": torch.randn(b, hkv * case.group, d, generator=gen),
        "k_pool": torch.randn(num_blocks, bs, d, generator=gen),
        "v_pool": torch.randn(num_blocks, bs, d, generator=gen),
        "block_tables": tables,
        "lengths": lengths,
    }
    if case.selected:
        sel_rows, counts = [], []
        for n in nblocks.view(-1).tolist():
            k = int(torch.randint(0, n + 1, (1,), generator=gen)) if n else 0
            pick = torch.randperm(n, generator=gen)[:k].tolist()  # unsorted subset of the row's blocks
            if n and n % 2:  # sometimes an index past the row's blocks, which must read nothing
                pick.append(n + 1)
            sel_rows.append(pick)
            counts.append(len(pick))
        max_sel = max(max(counts), 1)
        sel = torch.randint(-3, width + 5, (b * hkv, max_sel), generator=gen, dtype=torch.int32)  # garbage tails
        for r, pick in enumerate(sel_rows):
            sel[r, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
        args["selected_blocks"] = sel.view(b, hkv, max_sel)
        args["num_selected"] = torch.tensor(counts, dtype=torch.int32).view(b, hkv)
    if case.windowed:  # 0, the whole row, past it, or anywhere inside
        rows = lengths.view(-1).long()
        starts = (torch.rand(rows.shape, generator=gen) * (rows + 3).float()).long()
        edge = [0, int(rows[1]) if len(rows) > 1 else 0, -2][: len(starts)]
        starts[: len(edge)] = torch.tensor(edge)
        args["starts"] = starts.to(torch.int32).view(b, hkv)
    return {k: v.to(device=device, dtype=case.dtype if v.is_floating_point() else v.dtype)
            for k, v in args.items()}


def _scale(case: Case) -> float:
    # with a softcap, use large logits (std ~ 0.5 sqrt(D)) so that the cap bends them
    return 0.5 if case.softcap else case.head_dim**-0.5


def check_case(case: Case, gen: torch.Generator) -> Result:
    args = make_inputs(case, gen)
    scale = _scale(case)
    extra = {k: args[k] for k in ("selected_blocks", "num_selected", "starts") if k in args}
    base = (args["block_tables"], args["lengths"], scale, case.softcap)
    out = torch.full_like(args["q"], float("nan"))
    paged_decode_attention(args["q"], args["k_pool"], args["v_pool"], *base, **extra, num_splits=case.num_splits,
                           max_seqlen_k=case.max_seqlen_k, out=out)
    torch.cuda.synchronize()
    ref = paged_decode_attention_ref(args["q"].double(), args["k_pool"].double(), args["v_pool"].double(), *base,
                                     **extra)
    unwritten = int(torch.isnan(out).sum())
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    empty = (ref.abs().amax(dim=-1) == 0).view(-1)  # query heads whose row reads no token
    empty_exact = bool((out.view(-1, case.head_dim)[empty] == 0).all())
    tol = TOLERANCE[case.dtype]
    ok = unwritten == 0 and err < tol and empty_exact
    return case.name, ok, (f"rel err {err:.2e} (tol {tol:.0e}), unwritten {unwritten}, "
                           f"empty heads zero {empty_exact} ({int(empty.sum())} empty)")


def correctness_cases() -> list[Case]:
    cases = []
    shapes = [(1, 1, 1, 64, 16), (3, 2, 4, 128, 16), (8, 8, 1, 128, 64), (3, 8, 8, 64, 64), (8, 2, 8, 128, 16),
              (1, 8, 4, 128, 64)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases += [Case(*shape, dtype) for shape in shapes]
    # long rows: one at 64K next to empty and short ones; many splits
    cases.append(Case(3, 2, 4, 128, 64, torch.bfloat16, max_len=65536,
                      lengths=(65536, 0, 1, 64, 12345, 777)))
    cases.append(Case(1, 8, 4, 128, 16, torch.float16, max_len=65536, lengths=(65536, 65535, 1, 16, 17, 4096, 0,
                                                                               30000)))
    cases.append(Case(1, 2, 8, 64, 16, torch.float32, max_len=20000, lengths=(20000, 3)))
    # forced split counts: one split (direct write), and more splits than some rows have tokens for
    for splits in (1, 7, 128):
        cases.append(Case(3, 2, 4, 128, 16, torch.bfloat16, max_len=3000, num_splits=splits))
    # a host hint far below the real lengths: the last split must take the rest
    cases.append(Case(3, 2, 4, 128, 16, torch.bfloat16, max_len=3000, num_splits=4, max_seqlen_k=100))
    cases.append(Case(8, 2, 8, 128, 16, torch.bfloat16, max_len=3000, max_seqlen_k=3000))
    # soft-capped logits
    cases += [Case(3, 2, 4, 128, 16, dt, softcap=5.0) for dt in (torch.float32, torch.bfloat16)]
    # Quest-style selection of blocks
    for dtype in (torch.float32, torch.bfloat16):
        cases += [Case(3, 2, 4, 128, 16, dtype, selected=True), Case(8, 8, 1, 64, 64, dtype, selected=True),
                  Case(1, 2, 8, 128, 16, dtype, max_len=20000, selected=True),
                  Case(3, 2, 4, 128, 16, dtype, selected=True, num_splits=1)]
    cases.append(Case(3, 8, 4, 128, 16, torch.float16, selected=True, softcap=5.0, num_splits=5))
    # sliding windows: each row starts at its own first visible token
    for dtype in (torch.float32, torch.bfloat16):
        cases += [Case(3, 2, 4, 128, 16, dtype, windowed=True), Case(8, 8, 1, 64, 64, dtype, windowed=True),
                  Case(3, 2, 4, 128, 16, dtype, windowed=True, num_splits=1),
                  Case(1, 2, 8, 128, 16, dtype, max_len=20000, windowed=True, softcap=5.0)]
    return cases


def check_cuda_graph(gen: torch.Generator) -> Result:
    """A launch captured in a CUDA graph, replayed after the lengths changed in place, matches the reference."""
    case = Case(3, 2, 4, 128, 16, torch.bfloat16, max_len=2000)
    args = make_inputs(case, gen)
    out = torch.full_like(args["q"], float("nan"))
    call = (args["q"], args["k_pool"], args["v_pool"], args["block_tables"], args["lengths"], _scale(case))
    paged_decode_attention(*call, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*call, out=out)
    args["lengths"].copy_((args["lengths"] - 5).clamp_min(0))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_decode_attention_ref(*[t.double() if t.is_floating_point() else t for t in call[:5]], call[5])
    err = ((out.double() - ref).norm() / ref.norm()).item()
    ok = not torch.isnan(out).any() and err < TOLERANCE[case.dtype]
    return "paged_decode cuda graph replay (lengths changed)", bool(ok), f"rel err {err:.2e}"


def time_in_graph(calls: list[Callable[[], object]], reps: int = 24) -> float:
    """Median ms of one call, from a CUDA graph of ``reps`` calls cycling over ``calls``: no launch gaps (eager
    launches cost more host time than a short decode takes on the GPU) and, with enough distinct inputs among
    ``calls``, no L2 hits (do_bench also flushes L2 before each replay)."""
    from triton.testing import do_bench  # noqa: PLC0415

    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / reps


def time_decode(block_size: int, lengths: tuple[int, ...] = (4096, 16384, 65536, 131072),
                num_splits: int | None = None) -> Result:
    """GPU time and K+V bandwidth for B=1, Hkv=8, G=4, D=128 bf16, from graph replays over input sets that
    together exceed L2 several times (plus the eager time, host launch overhead included)."""
    from triton.testing import do_bench  # noqa: PLC0415

    hkv, group, d, dtype = 8, 4, 128, torch.bfloat16
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    parts, ok = [], True
    for n in lengths:
        kv_bytes = 2 * hkv * n * d * dtype.itemsize
        num_sets = max(1, math.ceil(4 * l2 / kv_bytes))  # one sequence of B=1 per set, all in one pool
        case = Case(num_sets, hkv, group, d, block_size, dtype, max_len=n, lengths=(n,) * hkv * num_sets)
        a = make_inputs(case, torch.Generator().manual_seed(n))
        out = torch.full_like(a["q"], float("nan"))
        calls = [functools.partial(paged_decode_attention, a["q"][i : i + 1], a["k_pool"], a["v_pool"],
                                   a["block_tables"][i : i + 1], a["lengths"][i : i + 1], d**-0.5, out=out[i : i + 1],
                                   num_splits=num_splits)
                 for i in range(num_sets)]
        ms = time_in_graph(calls)
        eager = do_bench(calls[0], warmup=25, rep=100, return_mode="median")
        gbps = kv_bytes / (ms * 1e-3) / 1e9
        parts.append(f"{n // 1024}K {ms * 1e3:.1f} us {gbps:.0f} GB/s (eager {eager * 1e3:.0f} us)")
        ok = ok and math.isfinite(ms) and not torch.isnan(out).any()
    splits = "default splits" if num_splits is None else f"{num_splits} splits"
    return f"paged_decode timing bf16 B=1 Hkv={hkv} G={group} D={d} bs={block_size}, {splits} (CUDA graph)", bool(ok), \
        "; ".join(parts)


def make_quant_rows(bsz: int, hkv: int, d: int, bits: int, group: int, max_q: int, dtype: torch.dtype,
                    gen: torch.Generator, device: str = "cuda", dead: float = 0.2):  # noqa: ANN201
    """Random quantized prefixes built with the codec itself: (QuantRows, number of live tokens per row)."""
    from longctx.attention.triton.paged_decode_quant import QuantRows  # noqa: PLC0415
    from longctx.kv.quant.kivi import Int4KV, Int8KV  # noqa: PLC0415

    codec = (Int8KV if bits == 8 else Int4KV)(group=group)
    qbs = codec.tokens_per_block(16)
    nq = torch.randint(0, max_q + 1, (bsz, hkv), generator=gen)
    nq.view(-1)[0] = max_q  # at least one full row
    if nq.numel() > 1:
        nq.view(-1)[1] = 0  # and one without a prefix
    total = int(nq.sum()) + 1
    k = torch.randn(total, qbs, d, generator=gen) * torch.rand(1, 1, d, generator=gen) * 3  # channel outliers
    v = torch.randn(total, qbs, d, generator=gen)
    data = {name: t.contiguous() for name, t in codec.encode(k, v).items()}
    alive = torch.rand(total, qbs, generator=gen) >= dead
    perm = torch.randperm(total - 1, generator=gen) + 1  # block 0 unused, like the null block
    tables = torch.zeros(bsz, hkv, max(max_q, 1), dtype=torch.int32)
    off = 0
    for b in range(bsz):
        for h in range(hkv):
            n = int(nq[b, h])
            tables[b, h, :n] = perm[off : off + n].to(torch.int32)
            off += n
    live = torch.zeros(bsz, hkv, dtype=torch.int64)
    for b in range(bsz):
        for h in range(hkv):
            live[b, h] = alive[tables[b, h, : int(nq[b, h])].long()].sum()
    rows = QuantRows({n: t.to(device) for n, t in data.items()}, alive.to(device), tables.to(device),
                     nq.to(torch.int32).to(device), bits, group, codec.value_group(d))
    return rows, live


def check_quant_case(bits: int, dtype: torch.dtype, bsz: int, hkv: int, group_q: int, d: int, max_q: int,
                     max_fp: int, gen: torch.Generator, quant_splits: int | None = None) -> Result:
    from longctx.attention.triton.paged_decode_quant import (  # noqa: PLC0415
        paged_decode_attention_quant,
        paged_decode_quant_ref,
    )

    case = Case(bsz, hkv, group_q, d, 16, dtype, max_len=max_fp)
    args = make_inputs(case, gen)
    quant, live = make_quant_rows(bsz, hkv, d, bits, 32, max_q, dtype, gen)
    scale = d**-0.5
    out = torch.full_like(args["q"], float("nan"))
    paged_decode_attention_quant(args["q"], args["k_pool"], args["v_pool"], args["block_tables"], args["lengths"],
                                 scale, quant, quant_splits=quant_splits, out=out)
    torch.cuda.synchronize()
    ref = paged_decode_quant_ref(args["q"].double(), args["k_pool"].double(), args["v_pool"].double(),
                                 args["block_tables"], args["lengths"], scale, quant)
    unwritten = int(torch.isnan(out).sum())
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = TOLERANCE[dtype]
    name = (f"paged_decode int{bits} {DTYPE_NAMES[dtype]} B={bsz} Hkv={hkv} G={group_q} D={d} "
            f"quant blocks<={max_q} fp<={max_fp}" + (f" quant_splits={quant_splits}" if quant_splits else ""))
    return name, unwritten == 0 and err < tol, (f"rel err {err:.2e} (tol {tol:.0e}), unwritten {unwritten}, "
                                                f"live quantized tokens {int(live.sum())}")


def quant_cases() -> list[tuple]:
    out = []
    for bits in (8, 4):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out.append((bits, dtype, 3, 2, 4, 128, 6, 100))
        out.append((bits, torch.bfloat16, 2, 8, 4, 64, 40, 64, 3))
        out.append((bits, torch.float16, 1, 8, 4, 128, 200, 70))
    return out


def run_all() -> list[Result]:
    """Every check as (name, passed, detail); prints nothing."""
    if not torch.cuda.is_available():
        return [("paged_decode", False, "CUDA is not available")]
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return [("paged_decode", False, "Triton is not installed")]
    gen = torch.Generator().manual_seed(0)
    results = []
    for case in correctness_cases():
        try:
            results.append(check_case(case, gen))
        except Exception as e:  # noqa: BLE001 - report every case, not only the first failure
            results.append((case.name, False, f"{type(e).__name__}: {e}"))
    for qc in quant_cases():
        try:
            results.append(check_quant_case(*qc[:8], gen, *qc[8:]))
        except Exception as e:  # noqa: BLE001
            results.append((f"paged_decode quant {qc}", False, f"{type(e).__name__}: {e}"))
    from longctx.attention.triton.check_prefill import run_prefill  # noqa: PLC0415

    results += run_prefill("cuda")
    checks = [lambda: check_cuda_graph(gen), lambda: time_decode(16), lambda: time_decode(64)]
    for name, fn in zip(("paged_decode cuda graph", "paged_decode timing bs=16", "paged_decode timing bs=64"),
                        checks, strict=True):
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001
            results.append((name, False, f"{type(e).__name__}: {e}"))
    return results
