"""GPU check: every fused op's Triton kernel against its torch twin on the same CUDA inputs.

Inputs are random, with strided views where the decoder passes them (q/k/v and gate/up are slices of one
fused projection output). The twin runs on the same device, so what is compared is the kernel alone:
outputs must agree within a few units in the last place of the dtype (the kernels round where the twins
round; only fp32 summation order and fused multiply-adds differ), pools must match in every slot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from longctx.model.rope import rotate
from longctx.ops.gated_act import ACTIVATIONS, gated_act, gated_act_ref
from longctx.ops.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from longctx.ops.rope_kv_write import rope_kv_write, rope_kv_write_ref

Result = tuple[str, bool, str]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # relative, ~2 ulp


def _rel(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| relative to max(|b|, 1e-3 * max|b|) elementwise."""
    a, b = a.double(), b.double()
    floor = 1e-3 * float(b.abs().max().clamp_min(1e-30))
    return float(((a - b).abs() / b.abs().clamp_min(floor)).max()) if b.numel() else 0.0


def _identical(a: Tensor, b: Tensor) -> float:
    return float((a == b).double().mean()) if a.numel() else 1.0


def _result(name: str, errors: dict[str, float], tol: float, same: float) -> Result:
    ok = all(e <= tol for e in errors.values())
    detail = ", ".join(f"{k} rel err {v:.1e}" for k, v in errors.items())
    return name, ok, f"{detail} (tol {tol:.0e}); {same:.1%} bit-identical"


def check_rms_norm(dtype: torch.dtype, rows: int, cols: int, gemma: bool, gen: torch.Generator) -> Result:
    x = (torch.randn(rows, cols + 8, generator=gen) * 3).to("cuda", dtype)[:, 4:-4]  # strided rows
    d = torch.randn(rows, cols, generator=gen).to("cuda", dtype)
    w = (torch.randn(cols, generator=gen) * 0.5 + (0 if gemma else 1)).to("cuda", dtype)
    out, ref = rms_norm(x, w, 1e-6, gemma), rms_norm_ref(x, w, 1e-6, gemma)
    (aout, ares), (rout, rres) = add_rms_norm(x, d, w, 1e-6, gemma), add_rms_norm_ref(x, d, w, 1e-6, gemma)
    errors = {"norm": _rel(out, ref), "add+norm": _rel(aout, rout), "residual": _rel(ares, rres)}
    name = f"rms_norm {'gemma ' if gemma else ''}{_dname(dtype)} [{rows}x{cols}]"
    return _result(name, errors, TOLERANCE[dtype], _identical(out, ref))


def check_gated_act(dtype: torch.dtype, rows: int, cols: int, act: str, gen: torch.Generator) -> Result:
    gu = (torch.randn(rows, 2 * cols, generator=gen) * 4).to("cuda", dtype)
    gate, up = gu.chunk(2, dim=-1)  # views with row stride 2 * cols, as the fused projection gives them
    out, ref = gated_act(gate, up, act), gated_act_ref(gate, up, act)
    return _result(f"gated_act {act} {_dname(dtype)} [{rows}x{cols}]", {"out": _rel(out, ref)}, TOLERANCE[dtype],
                   _identical(out, ref))


def check_rope_kv_write(dtype: torch.dtype, bsz: int, hq: int, hkv: int, d: int, gen: torch.Generator) -> Result:
    num_blocks, bs = 64, 16
    qkv = torch.randn(bsz, (hq + 2 * hkv) * d, generator=gen).to("cuda", dtype)
    q, k, v = (t.view(bsz, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))  # strided views
    pos = torch.randint(0, 100_000, (bsz,), generator=gen).cuda()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).cuda()
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[: bsz * hkv].cuda()
    pools = [torch.randn(num_blocks, bs, d, generator=gen).to("cuda", dtype) for _ in range(2)]
    pos_pool = torch.randint(0, 9, (num_blocks, bs), generator=gen).cuda()
    mine = [t.clone() for t in (*pools, pos_pool)]
    theirs = [t.clone() for t in (*pools, pos_pool)]
    out = rope_kv_write(q, k, v, cos, sin, *mine, slots, pos)
    ref = rope_kv_write_ref(q, k, v, cos, sin, *theirs, slots, pos)
    # Accuracy against the exact (fp64) rotation, in units of the dtype's epsilon times the magnitude of the
    # terms |x1 cos| + |x2 sin| (a rotation can cancel, so the result's own magnitude is no scale).
    eps = torch.finfo(dtype).eps
    exact_q = rotate(q.double(), cos[:, None].double(), sin[:, None].double())
    exact_k = rotate(k.double(), cos[:, None].double(), sin[:, None].double())
    c, s = cos[:, None].double().abs(), sin[:, None].double().abs()
    scale_q = q.double().abs() * c + _half_swap(q.double()).abs() * s
    scale_k = k.double().abs() * c + _half_swap(k.double()).abs() * s
    k_mine, k_theirs = mine[0].view(-1, d)[slots], theirs[0].view(-1, d)[slots]
    ulps = {
        "q kernel": _ulps(out, exact_q, scale_q, eps), "q twin": _ulps(ref, exact_q, scale_q, eps),
        "k kernel": _ulps(k_mine.view_as(k), exact_k, scale_k, eps),
        "k twin": _ulps(k_theirs.view_as(k), exact_k, scale_k, eps),
    }
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    pools_ok = (all(bool((m.view(-1, *m.shape[2:])[untouched] == t.view(-1, *t.shape[2:])[untouched]).all())
                    for m, t in zip(mine, theirs, strict=True))
                and bool((mine[1] == theirs[1]).all()) and bool((mine[2] == theirs[2]).all()))
    ok = ulps["q kernel"] <= 1.0 and ulps["k kernel"] <= 1.0 and pools_ok
    detail = ", ".join(f"{n} {u:.2f}" for n, u in ulps.items())
    return (f"rope_kv_write {_dname(dtype)} B={bsz} Hq={hq} Hkv={hkv} D={d}", ok,
            f"max error in eps x |terms|: {detail} (kernel tol 1.0); v, positions and other slots equal: {pools_ok}")


def _half_swap(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def _ulps(got: Tensor, exact: Tensor, scale: Tensor, eps: float) -> float:
    return float(((got.double() - exact).abs() / (scale * eps).clamp_min(1e-300)).max())


def _dname(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def cases() -> list[tuple[str, Callable[[torch.Generator], Result]]]:
    out: list[tuple[str, Callable[[torch.Generator], Result]]] = []
    for dtype in DTYPES.values():
        for rows, cols, gemma in ((1, 4096, False), (37, 896, False), (5, 1152, True), (300, 128, False)):
            out.append((f"rms_norm {dtype}", lambda g, a=(dtype, rows, cols, gemma): check_rms_norm(*a, g)))
        for act in ACTIVATIONS:
            out.append((f"gated_act {act}", lambda g, a=(dtype, 3, 14336, act): check_gated_act(*a, g)))
        for bsz, hq, hkv, d in ((1, 32, 8, 128), (5, 14, 2, 64), (3, 4, 4, 80)):
            out.append(("rope_kv_write", lambda g, a=(dtype, bsz, hq, hkv, d): check_rope_kv_write(*a, g)))
    return out


def run_all() -> list[Result]:
    """Every check as (name, passed, detail); prints nothing."""
    if not torch.cuda.is_available():
        return [("ops", False, "CUDA is not available")]
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, fn in cases():
        try:
            results.append(fn(gen))
        except Exception as e:  # noqa: BLE001 - report every case, not only the first failure
            results.append((name, False, f"{type(e).__name__}: {e}"))
    return results
