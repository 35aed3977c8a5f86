"""Prompt chunks attended in place: the varlen paged prefill kernel (``attention/triton/paged_prefill.py``) over
the rows of every sequence of a step whose layer step needs only the attention output
(:meth:`~longctx.kv.sequence.SequenceKV.paged_prefill_ready`), instead of gathering each row into a dense copy
and running SDPA on it one sequence at a time.

Opt-in with ``LONGCTX_PAGED_PREFILL=1`` until the kernel has been checked and timed on the GPU (then it becomes
the default where it is faster; ``scripts/gpu_prefill_kernel.py``). On CUDA with Triton it launches the kernel
(unless ``LONGCTX_KERNELS=torch``); elsewhere it runs the kernel's plain-torch twin, which is how the CPU tests
check this path end to end.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from longctx.attention.triton.paged_prefill import (
    HAS_TRITON,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from longctx.device import to_device
from longctx.kv.sequence import SequenceKV
from longctx.ops.dispatch import kernels_forced_off


def paged_prefill_enabled() -> bool:
    """``LONGCTX_PAGED_PREFILL=1`` turns the in-place prompt-chunk attention on."""
    return os.environ.get("LONGCTX_PAGED_PREFILL", "") == "1"


def attend_in_place(seqs: list[SequenceKV], layer: int, queries: list[Tensor]) -> list[Tensor]:
    """Attention of each sequence's rotated chunk queries ([n_s, Hq, D], already appended to its rows) over its
    rows of ``layer``, in one launch; returns one [n_s, Hq, D] output per sequence."""
    cfg, pool = seqs[0].cfg, seqs[0].rows.pool
    assert all(s.rows.pool is pool for s in seqs), "attend_in_place needs sequences of one pool"
    held = [s.rows.block_table_np(layer) for s in seqs]
    table = np.zeros((len(seqs), cfg.num_kv_heads, max(t.shape[1] for t in held)), dtype=np.int32)
    for i, t in enumerate(held):
        table[i, :, : t.shape[1]] = t
    lengths = np.asarray([s.rows.lengths[layer] for s in seqs], dtype=np.int32)
    both = to_device(torch.from_numpy(np.concatenate([table.reshape(-1), lengths.reshape(-1)])), pool.device)
    tables = both[: table.size].view(table.shape)
    lens = both[table.size :].view(lengths.shape)
    cu = [0]
    for q in queries:
        cu.append(cu[-1] + q.shape[0])
    q = torch.cat(queries) if len(queries) > 1 else queries[0]
    q = q.to(pool.k.dtype).contiguous()
    if q.is_cuda and HAS_TRITON and not kernels_forced_off():
        out = paged_prefill_attention(q, pool.k, pool.v, tables, lens, cu, cfg.scale)
    else:
        out = paged_prefill_attention_ref(q, pool.k, pool.v, tables, lens, torch.tensor(cu), cfg.scale)
    return list(out.to(queries[0].dtype).split([e - s for s, e in zip(cu, cu[1:], strict=False)]))
