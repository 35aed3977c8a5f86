"""GPU check of the varlen paged prefill kernel (``paged_prefill.py``) against its torch twin, run in fp64.

Cases: packed chunks of ragged lengths (0, 1, block boundaries, longer than a tile), rows of different lengths
per kv head (compressed prefixes), shuffled pool blocks and garbage table tails, GQA ratios, soft-capping, a
sliding window over original positions, fp32 / bf16 / fp16. The kernel's output buffer is filled with NaN first,
so an element it fails to write shows. ``run_prefill("cpu")`` runs the fp32 cases under Triton's interpreter on
a machine without a GPU (Triton installed, numpy < 2: the 3.6 interpreter turns loaded scalars into 1-element
arrays, which numpy 2 refuses as loop bounds)::

    TRITON_INTERPRET=1 python -c "from longctx.attention.triton import check_prefill as c; print(c.run_prefill('cpu'))"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.triton.paged_prefill import paged_prefill_attention, paged_prefill_attention_ref

Result = tuple[str, bool, str]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class PrefillCase:
    chunks: tuple[int, ...]
    prefixes: tuple[int, ...]  # [S * Hkv] cached tokens before each row's chunk (row length = prefix + chunk)
    num_kv_heads: int
    group: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    softcap: float | None = None
    window: int | None = None

    @property
    def name(self) -> str:
        extra = (f", softcap {self.softcap}" if self.softcap else "") + (f", window {self.window}" if self.window
                                                                          else "")
        return (f"paged_prefill chunks {list(self.chunks)} Hkv {self.num_kv_heads} G {self.group} D {self.head_dim}"
                f" bs {self.block_size} {str(self.dtype).removeprefix('torch.')}{extra}")


def prefill_cases() -> list[PrefillCase]:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return [
        PrefillCase((5, 1, 40), (0, 7, 3, 0, 100, 61), 2, 2, 64, 16, f32),
        PrefillCase((33, 0, 16), (16, 15, 0, 0, 17, 200), 2, 4, 128, 16, f32, softcap=30.0),
        PrefillCase((70,), (300, 5, 0, 64), 4, 1, 64, 16, f32, window=48),
        PrefillCase((17, 9), (31, 2, 0, 77), 2, 3, 80, 16, f32, window=30),  # G 3 padded to 4, head_dim 80
        PrefillCase((5, 1, 40), (0, 7, 3, 0, 100, 61), 2, 2, 64, 16, bf16),
        PrefillCase((64, 3), (128, 1, 9, 0), 2, 8, 128, 16, f16, window=20),
        PrefillCase((17, 9), (31, 2, 0, 77), 2, 3, 80, 16, bf16, softcap=50.0),  # head_dim 80, G 3: padded tiles
    ]


def make_inputs(case: PrefillCase, gen: torch.Generator, device: str) -> dict:
    """Random inputs for ``case`` (fp32 on the CPU; the caller casts): shuffled blocks, garbage table tails,
    increasing positions with gaps per row, the chunk at the sequence's newest positions."""
    s_count, hkv, bs, d = len(case.chunks), case.num_kv_heads, case.block_size, case.head_dim
    lengths = [case.prefixes[r] + case.chunks[r // hkv] for r in range(s_count * hkv)]
    nblocks = [(n + bs - 1) // bs for n in lengths]
    num_blocks = sum(nblocks) + 5
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(max(nblocks), 1) + 2
    tables = torch.randint(0, num_blocks, (s_count * hkv, width), generator=gen, dtype=torch.int32)
    pos_pool = torch.randint(0, 1 << 20, (num_blocks, bs), generator=gen)
    cu = [0]
    for n in case.chunks:
        cu.append(cu[-1] + n)
    q_pos = torch.zeros(cu[-1], dtype=torch.int64)
    newest = 4 * max(lengths) + 10
    for r, n in enumerate(lengths):
        s, chunk = r // hkv, case.chunks[r // hkv]
        tables[r, : nblocks[r]] = torch.tensor(ids[: nblocks[r]], dtype=torch.int32)
        del ids[: nblocks[r]]
        older = torch.sort(torch.randperm(newest - chunk, generator=gen)[: n - chunk]).values
        row_pos = torch.cat([older, torch.arange(newest - chunk, newest)])
        idx = torch.arange(n)
        pos_pool[tables[r, idx // bs].long(), idx % bs] = row_pos
        q_pos[cu[s] : cu[s + 1]] = torch.arange(newest - chunk, newest)
    return {"q": torch.randn(cu[-1], hkv * case.group, d, generator=gen),
            "k_pool": torch.randn(num_blocks, bs, d, generator=gen),
            "v_pool": torch.randn(num_blocks, bs, d, generator=gen),
            "block_tables": tables.view(s_count, hkv, width).to(device),
            "lengths": torch.tensor(lengths, dtype=torch.int32).view(s_count, hkv).to(device),
            "cu": cu, "pos_pool": pos_pool.to(device), "q_pos": q_pos.to(device)}


def check_prefill_case(case: PrefillCase, gen: torch.Generator, device: str = "cuda") -> Result:
    x = make_inputs(case, gen, device)
    q, kp, vp = (x[n].to(device, case.dtype) for n in ("q", "k_pool", "v_pool"))
    win = {"window": case.window, "pos_pool": x["pos_pool"], "q_pos": x["q_pos"]} if case.window else {}
    scale = case.head_dim ** -0.5
    want = paged_prefill_attention_ref(q.double(), kp.double(), vp.double(), x["block_tables"], x["lengths"],
                                       torch.tensor(x["cu"], device=device), scale, case.softcap, **win)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kp, vp, x["block_tables"], x["lengths"], x["cu"], scale, case.softcap, out=out,
                            **win)
    err = _rel_error(out, want)
    return case.name, bool(err <= TOLERANCE[case.dtype]), f"relative error {err:.2e} (tol {TOLERANCE[case.dtype]:.0e})"


def _rel_error(out: Tensor, want: Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - want).norm() / want.norm().clamp_min(1e-30))


def run_prefill(device: str = "cuda") -> list[Result]:
    """Every prefill case as (name, passed, detail); on "cpu" only under ``TRITON_INTERPRET=1``."""
    gen = torch.Generator().manual_seed(0)
    results = []
    for case in prefill_cases():
        if device == "cpu" and case.dtype != torch.float32:
            continue  # the interpreter computes half types through numpy: fp32 cases only
        try:
            results.append(check_prefill_case(case, gen, device))
        except Exception as e:  # noqa: BLE001 - report every case
            results.append((case.name, False, f"{type(e).__name__}: {e}"))
    return results
