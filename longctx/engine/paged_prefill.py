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
from itertools import accumulate

import numpy as np
import torch
from torch import Tensor

from longctx.attention.triton.paged_prefill import (
    HAS_TRITON,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from longctx.kv.rows import upload_tables
from longctx.kv.sequence import SequenceKV
from longctx.ops.dispatch import kernels_forced_off


def paged_prefill_enabled() -> bool:
    """``LONGCTX_PAGED_PREFILL=1`` turns the in-place prompt-chunk attention on."""
    return os.environ.get("LONGCTX_PAGED_PREFILL", "") == "1"


def attend_in_place(seqs: list[SequenceKV], layer: int, queries: list[Tensor]) -> list[Tensor]:
    """Attention of each sequence's rotated chunk queries ([n_s, Hq, D], already appended to its rows) over its
    rows of ``layer``, in one launch; returns one [n_s, Hq, D] output per sequence."""
    cfg, pool = seqs[0].cfg, seqs[0].rows.pool
    tables, lens = upload_tables([(s.rows, layer) for s in seqs], np.int32)
    tables, lens = tables.view(len(seqs), cfg.num_kv_heads, -1), lens.view(len(seqs), cfg.num_kv_heads)
    sizes = [q.shape[0] for q in queries]
    cu = [0, *accumulate(sizes)]
    q = torch.cat(queries) if len(queries) > 1 else queries[0]
    q = q.to(pool.k.dtype).contiguous()
    if q.is_cuda and HAS_TRITON and not kernels_forced_off():
        out = paged_prefill_attention(q, pool.k, pool.v, tables, lens, cu, cfg.scale)
    else:
        out = paged_prefill_attention_ref(q, pool.k, pool.v, tables, lens, torch.tensor(cu), cfg.scale)
    return list(out.to(queries[0].dtype).split(sizes))
