"""Time the varlen paged prefill kernel against today's path for a prompt chunk, per layer, on the GPU:

    python scripts/gpu_prefill_kernel.py [--prefixes 0,4096,32768] [--chunks 512,2048] [--seqs 1,4] [--device cuda]

Today's path (``SequenceKV.attend_layer``) copies each prefilling row out of the pool (gather of its K/V by
slot) and runs SDPA with a causal-prefix mask; the kernel reads the rows where they lie. Shapes: the 8B model's
32 query / 8 kv heads, head dim 128, bf16, block size 16; rows uncompressed (prefix + chunk tokens). Each
variant is timed alone in a CUDA graph (``--device cpu``: a dry run of the twin against gather + SDPA at small
sizes, checking they agree, no timing). Prints one line per shape: microseconds per layer for both and their
ratio; the prefix-0 lines show whether SDPA over a chunk with no cached prefix stays faster (the crossover).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_select_kernels import _graph_time  # noqa: E402 (scripts/: one CUDA-graph timer for kernel scripts)

from longctx.attention.triton.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

HQ, HKV, D, BS = 32, 8, 128, 16


def _inputs(seqs: int, prefix: int, chunk: int, device: str, dtype: torch.dtype) -> dict:
    length = prefix + chunk
    nb = (length + BS - 1) // BS
    g = torch.Generator(device="cpu").manual_seed(0)
    perm = torch.randperm(seqs * HKV * nb, generator=g).to(torch.int32) + 1
    return {
        "q": torch.randn(seqs * chunk, HQ, D, generator=g).to(device, dtype),
        "k_pool": torch.randn(seqs * HKV * nb + 1, BS, D, generator=g).to(device, dtype),
        "v_pool": torch.randn(seqs * HKV * nb + 1, BS, D, generator=g).to(device, dtype),
        "block_tables": perm.view(seqs, HKV, nb).to(device),
        "lengths": torch.full((seqs, HKV), length, dtype=torch.int32, device=device),
        "cu": [i * chunk for i in range(seqs + 1)],
    }


def gather_sdpa(x: dict, prefix: int, chunk: int) -> torch.Tensor:
    """Today's path: each sequence's rows gathered into dense [Hkv, L, D] copies, then SDPA (GQA, causal prefix)."""
    seqs, length = x["lengths"].shape[0], prefix + chunk
    idx = torch.arange(length, device=x["q"].device)
    mask = idx[None, :] <= (prefix + torch.arange(chunk, device=idx.device))[:, None]
    outs = []
    for s in range(seqs):
        slots = x["block_tables"][s][:, idx // BS].long() * BS + idx % BS  # [Hkv, L]
        k = x["k_pool"].view(-1, D)[slots]
        v = x["v_pool"].view(-1, D)[slots]
        q = x["q"][s * chunk : (s + 1) * chunk].transpose(0, 1)[None]  # [1, Hq, n, D]
        o = F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=None if prefix == 0 else mask,
                                           is_causal=prefix == 0, scale=D ** -0.5, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def kernel(x: dict) -> torch.Tensor:
    return paged_prefill_attention(x["q"], x["k_pool"], x["v_pool"], x["block_tables"], x["lengths"], x["cu"],
                                   D ** -0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", default="0,4096,32768")
    ap.add_argument("--chunks", default="512,2048")
    ap.add_argument("--seqs", default="1,4")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    if args.device == "cpu":  # dry run: agreement only, at small sizes
        x = _inputs(2, 40, 24, "cpu", torch.float32)
        want = paged_prefill_attention_ref(x["q"], x["k_pool"], x["v_pool"], x["block_tables"], x["lengths"],
                                           torch.tensor(x["cu"]), D ** -0.5)
        err = (gather_sdpa(x, 40, 24) - want).abs().max().item()
        print(f"dry run on cpu: twin vs gather + SDPA max difference {err:.2e}")
        return 0 if err < 1e-4 else 1
    print(f"{'seqs':>4} {'prefix':>7} {'chunk':>6} {'gather+SDPA us':>15} {'kernel us':>10} {'kernel / SDPA':>14}")
    for seqs in ints(args.seqs):
        for prefix in ints(args.prefixes):
            for chunk in ints(args.chunks):
                x = _inputs(seqs, prefix, chunk, "cuda", torch.bfloat16)
                err = (kernel(x).float() - gather_sdpa(x, prefix, chunk).float()).abs().max().item()
                t_sdpa = _graph_time(lambda x=x, p=prefix, c=chunk: gather_sdpa(x, p, c))
                t_kernel = _graph_time(lambda x=x: kernel(x))
                print(f"{seqs:>4} {prefix:>7} {chunk:>6} {t_sdpa:>15.1f} {t_kernel:>10.1f} {t_kernel / t_sdpa:>14.2f}"
                      f"   (max diff {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
