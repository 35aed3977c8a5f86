"""Paged decode attention: one new query per sequence over its rows in the block pool (flash-decoding).

Layout (``kv/pool.py``, ``kv/rows.py``): a *row* is one (sequence, layer, kv-head); its tokens lie in order in
blocks of ``block_size``, token i of row (b, h) at ``k_pool[block_tables[b, h, i // block_size], i % block_size]``.
Query head j of a sequence reads kv row j // G, G = num_heads / num_kv_heads (GQA).

Three pieces (``STYLE.md``): :func:`paged_decode_attention_ref` (readable torch, the oracle),
``_paged_decode_kernel`` + ``_merge_splits_kernel`` (Triton), and :func:`paged_decode_attention` (checks, launch).

Select axis (Quest-style): given ``selected_blocks`` [B, Hkv, max_sel] (indices into the row's block table) and
``num_selected`` [B, Hkv], row (b, h) reads only blocks ``selected_blocks[b, h, :num_selected[b, h]]``; a token of
a selected block counts iff its index in the row is < ``lengths[b, h]``. Indices outside [0, ceil(length /
block_size)) contribute nothing; a repeated index counts twice (callers pass distinct indices).

Sliding windows: with ``starts`` [B, Hkv] int, row (b, h) attends only to its tokens ``starts[b, h] <= i <
lengths[b, h]`` (rows are in position order, so a window's visible tokens are a suffix of the row; the caller
counts the ones that fell out of it). Not combined with selection.

Sentinels: entries of ``block_tables`` past a row's ``ceil(length / block_size)`` blocks and entries of
``selected_blocks`` past ``num_selected`` are never read (0 = ``NULL_BLOCK`` by convention). A row that reads no
token (length 0, or nothing selected) gives exact zeros for its G query heads.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

try:  # optional: the reference and the argument checks work without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

HAS_TRITON = triton is not None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLITS = 128  # the merge kernel holds all splits of one head in registers
MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost (q load, partial write, merge) dominates
PROGRAMS_PER_SM = 4  # target resident programs per SM when choosing num_splits


# ---- reference ------------------------------------------------------------------------------------------------
def _row_tokens(b: int, h: int, block_size: int, lengths: Tensor, selected_blocks: Tensor | None,
                num_selected: Tensor | None, starts: Tensor | None = None) -> Tensor:
    """Indices (into row (b, h)) of the tokens the query attends to: int64 [n]."""
    length, dev = int(lengths[b, h]), lengths.device
    if selected_blocks is None:
        return torch.arange(0 if starts is None else min(max(int(starts[b, h]), 0), length), length, device=dev)
    assert num_selected is not None
    n = min(max(int(num_selected[b, h]), 0), selected_blocks.shape[2])
    sel = selected_blocks[b, h, :n].long()  # [n] indices into the row's block table
    tok = sel[:, None] * block_size + torch.arange(block_size, device=dev)  # [n, block_size]
    return tok[(sel[:, None] >= 0) & (tok < length)]


def paged_decode_attention_ref(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor, scale: float,
    softcap: float | None = None, selected_blocks: Tensor | None = None, num_selected: Tensor | None = None,
    starts: Tensor | None = None,
) -> Tensor:
    """Decode attention over paged rows, one row at a time in plain torch (fp32; fp64 for fp64 inputs).

    q [B, Hq, D] (rotated), k_pool/v_pool [num_blocks, block_size, D], block_tables [B, Hkv, max_blocks] int,
    lengths [B, Hkv] int, optional selected_blocks [B, Hkv, max_sel] int + num_selected [B, Hkv] int, optional
    starts [B, Hkv] int (a sliding window's first visible token; module doc).
    Logits are ``q·k * scale``, soft-capped as ``softcap * tanh(logits / softcap)`` when ``softcap`` is set.
    Returns out [B, Hq, D] in q's dtype.
    """
    _check_shapes(q, k_pool, v_pool, block_tables, lengths, softcap, selected_blocks, num_selected, starts)
    bsz, hq, d = q.shape
    hkv, max_blocks = block_tables.shape[1:]
    group, bs = hq // hkv, k_pool.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k_flat, v_flat = k_pool.reshape(-1, d), v_pool.reshape(-1, d)  # [num_blocks * block_size, D]
    out = torch.zeros(bsz, hq, d, dtype=acc, device=q.device)
    for b in range(bsz):
        for h in range(hkv):
            tok = _row_tokens(b, h, bs, lengths, selected_blocks, num_selected, starts)  # [n]
            if tok.numel() == 0:
                continue
            if int(tok.max()) >= max_blocks * bs:
                raise ValueError(f"row ({b}, {h}) has {int(lengths[b, h])} tokens but only {max_blocks} blocks")
            slots = block_tables[b, h, tok // bs].long() * bs + tok % bs  # [n] flat pool slots
            k, v = k_flat[slots].to(acc), v_flat[slots].to(acc)  # [n, D]
            heads = slice(h * group, (h + 1) * group)
            s = q[b, heads].to(acc) @ k.T * scale  # [G, n]
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            out[b, heads] = torch.softmax(s, dim=-1) @ v  # [G, D]
    return out.to(q.dtype)


# ---- kernels ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
        """One step of the online softmax: logits ``s`` [M, N] (log2 units, -inf where hidden) against values
        ``v`` [N, D]; returns the updated running max, sum and accumulator [M, D] (the paged kernels share it)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pexp = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pexp, 1)
        if IEEE:
            pv = tl.dot(pexp, v, input_precision="ieee")
        else:
            pv = tl.dot(pexp.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, sel_ptr, nsel_ptr, o_ptr, lse_ptr, start_ptr,
        scale, softcap, max_blocks, max_sel, split_offset,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt,
        stride_tb, stride_th, stride_lb, stride_lh, stride_sb, stride_sh, stride_nb, stride_nh,
        stride_ob, stride_oh, stride_os, stride_eb, stride_eh, stride_stb, stride_sth,
        G: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SELECTED: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, IEEE: tl.constexpr, HAS_START: tl.constexpr,
    ):
        """One program: the G query heads of kv row (b, h) over one split of the row's tokens.

        Iterates over *logical* positions p (row tokens; with selection, p // BLOCK_SIZE indexes the selected
        list), BLOCK_N per step; each position's block id comes from the block table, so a step may span several
        pool blocks. Writes out [B, Hq, D] directly when SINGLE_SPLIT, else partial out [B, Hq, S, D] (normalised
        per split) and its natural-log LSE [B, Hq, S] (-inf for a split that read nothing).
        """
        LOG2E: tl.constexpr = 1.4426950408889634
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(len_ptr + b * stride_lb + h * stride_lh)
        if HAS_SELECTED:
            nsel = tl.minimum(tl.maximum(tl.load(nsel_ptr + b * stride_nb + h * stride_nh), 0), max_sel)
            num_pos = nsel * BLOCK_SIZE
        else:
            num_pos = length
        first = 0
        if HAS_START:  # a sliding window: the row's tokens before ``first`` are out of it
            first = tl.minimum(tl.maximum(tl.load(start_ptr + b * stride_stb + h * stride_sth), 0), num_pos)
        # Each row cuts its own positions into equal ranges (whole BLOCK_N steps): balanced for ragged rows, and
        # read on the device, so a captured graph stays balanced as rows grow.
        tokens_per_split = tl.cdiv(tl.cdiv(num_pos - first, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        start = first + split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, num_pos)

        offs_g = tl.arange(0, BLOCK_H)  # query heads of the group, padded to >= 16 rows for tl.dot
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask, d_mask = offs_g < G, offs_d < HEAD_DIM
        heads = h * G + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
        table_row = table_ptr + b * stride_tb + h * stride_th
        sel_row = sel_ptr + b * stride_sb + h * stride_sh

        m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)  # running max in log2 units; finite so no inf - inf
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for p0 in range(start, end, BLOCK_N):
            p = p0 + offs_n  # [BLOCK_N] logical positions
            in_range = p < end
            if HAS_SELECTED:
                sel = tl.load(sel_row + p // BLOCK_SIZE, mask=in_range, other=-1)
                valid = in_range & (sel >= 0) & (sel * BLOCK_SIZE + p % BLOCK_SIZE < length)
                bidx = sel
            else:
                valid = in_range
                bidx = p // BLOCK_SIZE
            valid = valid & (bidx < max_blocks)  # memory safety only: lengths must fit the table
            block_id = tl.load(table_row + bidx, mask=valid, other=0).to(tl.int64)
            slot = p % BLOCK_SIZE
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + (block_id * stride_kb + slot * stride_kt)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptr + (block_id * stride_vb + slot * stride_vt)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))  # [BLOCK_H, BLOCK_N] fp32
            s = s * scale
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            s = tl.where(valid[None, :], s * LOG2E, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that read nothing: acc is 0 -> zeros
        o_offs = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        o_mask = g_mask[:, None] & d_mask[None, :]
        if SINGLE_SPLIT:
            tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=o_mask)
        else:  # partials at split index split_offset + split (the quantized kernel fills others)
            tl.store(o_ptr + o_offs + (split_offset + split) * stride_os, o, mask=o_mask)
            lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) / LOG2E, float("-inf"))
            tl.store(lse_ptr + b * stride_eb + heads * stride_eh + split_offset + split, lse, mask=g_mask)

    @triton.jit
    def _merge_splits_kernel(
        part_ptr, lse_ptr, out_ptr, num_splits,
        stride_pb, stride_ph, stride_ps, stride_eb, stride_eh, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """out[b, j] = sum_s exp(lse_s) * part_s / sum_s exp(lse_s) over the splits of query head j."""
        b, j = tl.program_id(0), tl.program_id(1)
        offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        s_mask, d_mask = offs_s < num_splits, offs_d < HEAD_DIM
        lse = tl.load(lse_ptr + b * stride_eb + j * stride_eh + offs_s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)  # [BLOCK_S]; all zero for an empty row
        part = tl.load(part_ptr + b * stride_pb + j * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                       mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        den = tl.sum(w, 0)
        o = tl.sum(w[:, None] * part, 0) / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + b * stride_ob + j * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


# ---- checks and launch ----------------------------------------------------------------------------------------
def _check_shapes(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                  softcap: float | None, selected_blocks: Tensor | None, num_selected: Tensor | None,
                  starts: Tensor | None = None) -> None:
    if q.dim() != 3 or k_pool.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] and k_pool [num_blocks, block_size, D], got {tuple(q.shape)} "
                         f"and {tuple(k_pool.shape)}")
    if v_pool.shape != k_pool.shape or k_pool.shape[2] != q.shape[2]:
        raise ValueError(f"k_pool {tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)} and q {tuple(q.shape)} "
                         "disagree on [num_blocks, block_size, D]")
    if block_tables.dim() != 3 or block_tables.shape[0] != q.shape[0] or block_tables.shape[2] < 1:
        raise ValueError(f"block_tables must be [B={q.shape[0]}, Hkv, max_blocks >= 1], "
                         f"got {tuple(block_tables.shape)}")
    bsz, hkv = block_tables.shape[:2]
    if hkv < 1 or q.shape[1] % hkv:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {hkv}")
    if tuple(lengths.shape) != (bsz, hkv):
        raise ValueError(f"lengths must be [B, Hkv] = {(bsz, hkv)}, got {tuple(lengths.shape)}")
    for name, t in (("block_tables", block_tables), ("lengths", lengths)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap must be positive (or None/0 for none), got {softcap}")
    if (selected_blocks is None) != (num_selected is None):
        raise ValueError("selected_blocks and num_selected go together")
    if selected_blocks is not None and num_selected is not None:
        if selected_blocks.dim() != 3 or tuple(selected_blocks.shape[:2]) != (bsz, hkv) or selected_blocks.shape[2] < 1:
            raise ValueError(f"selected_blocks must be [B, Hkv, max_sel >= 1] with [B, Hkv] = {(bsz, hkv)}, "
                             f"got {tuple(selected_blocks.shape)}")
        if tuple(num_selected.shape) != (bsz, hkv):
            raise ValueError(f"num_selected must be [B, Hkv] = {(bsz, hkv)}, got {tuple(num_selected.shape)}")
    if starts is not None:
        if selected_blocks is not None:
            raise ValueError("starts (a sliding window) and selected_blocks cannot be combined")
        if tuple(starts.shape) != (bsz, hkv) or starts.dtype.is_floating_point or starts.dtype == torch.bool:
            raise ValueError(f"starts must be an integer [B, Hkv] = {(bsz, hkv)} tensor, got {tuple(starts.shape)} "
                             f"{starts.dtype}")


def _check_kernel_args(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                       selected_blocks: Tensor | None, num_selected: Tensor | None, out: Tensor | None,
                       starts: Tensor | None = None) -> None:
    if q.dtype not in KERNEL_DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q, k_pool and v_pool must share one dtype of {KERNEL_DTYPES}, got {q.dtype}, "
                         f"{k_pool.dtype}, {v_pool.dtype}")
    ints = {"block_tables": block_tables, "lengths": lengths, "selected_blocks": selected_blocks,
            "num_selected": num_selected, "starts": starts}
    for name, t in ints.items():
        if t is not None and t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    tensors = {"q": q, "k_pool": k_pool, "v_pool": v_pool, **ints, "out": out}
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t is not None and t.dim() == 3 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    if q.shape[2] > 256:
        raise ValueError(f"head_dim {q.shape[2]} > 256 is not supported")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(num_rows: int, max_tokens: int, num_sms: int) -> int:
    """Splits per row: enough programs to keep every SM busy, but at least MIN_TOKENS_PER_SPLIT tokens each."""
    by_occupancy = math.ceil(PROGRAMS_PER_SM * num_sms / max(num_rows, 1))
    by_length = math.ceil(max_tokens / MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def _launch_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N tokens per step, num_warps, num_stages): K and V tiles of ~16 KB each per stage."""
    if dtype == torch.float32:
        return (32 if head_dim > 64 else 64), 4, 2
    return (64 if head_dim > 64 else 128), 4, 3


def paged_decode_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor, scale: float,
    softcap: float | None = None, selected_blocks: Tensor | None = None, num_selected: Tensor | None = None,
    *, num_splits: int | None = None, max_seqlen_k: int | None = None, out: Tensor | None = None,
    starts: Tensor | None = None,
) -> Tensor:
    """Triton flash-decoding over paged rows; same arguments and result as :func:`paged_decode_attention_ref`.

    Needs CUDA tensors: q, k_pool, v_pool of one dtype (fp32/fp16/bf16) with a contiguous last dimension, int32
    block_tables/lengths (and selected_blocks/num_selected). ``lengths[b, h]`` must fit the table:
    <= max_blocks * block_size (not checked: that would need a device sync).

    Each row's positions are cut into ``num_splits`` equal ranges (one program each), sized in the kernel from
    the row's own length. ``num_splits`` defaults to :func:`default_num_splits` of ``max_seqlen_k``, a host-side
    hint of the longest row, or else of the table width (max_blocks * block_size; max_sel * block_size with
    selection), so no device sync is needed; a wrong hint only changes how many programs share the work.
    ``out`` [B, Hq, D] receives the result (e.g. a CUDA-graph static buffer). Launches never synchronise with
    the host, so they can be captured in a CUDA graph (the number of splits is then fixed at capture).
    """
    _check_shapes(q, k_pool, v_pool, block_tables, lengths, softcap, selected_blocks, num_selected, starts)
    _check_kernel_args(q, k_pool, v_pool, block_tables, lengths, selected_blocks, num_selected, out, starts)
    if not HAS_TRITON:
        raise RuntimeError("paged_decode_attention needs Triton, which is not installed; "
                           "use paged_decode_attention_ref instead")
    if not q.is_cuda:
        raise RuntimeError(f"paged_decode_attention needs CUDA tensors, got {q.device}; "
                           "use paged_decode_attention_ref instead")
    bsz, hq, d = q.shape
    hkv, max_blocks = block_tables.shape[1:]
    bs = k_pool.shape[1]
    selected = selected_blocks is not None
    max_tokens = (selected_blocks.shape[2] if selected else max_blocks) * bs  # bound on positions a row reads
    if max_seqlen_k is not None:
        max_tokens = max(1, min(max_tokens, int(max_seqlen_k)))
    if num_splits is None:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = default_num_splits(bsz * hkv, max_tokens, _num_sms(index))
    elif not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    return launch_with_partials(q, k_pool, v_pool, block_tables, lengths, scale, softcap, selected_blocks,
                                num_selected, num_splits, out, starts=starts)


def launch_with_partials(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor, scale: float,
    softcap: float | None, selected_blocks: Tensor | None, num_selected: Tensor | None, num_splits: int,
    out: Tensor | None, extra_splits: int = 0, extra_launch=None, starts: Tensor | None = None,  # noqa: ANN001
) -> Tensor:
    """Launch the fp kernel over ``num_splits`` splits, plus (``extra_launch(part, lse, offset)``) another
    kernel writing ``extra_splits`` more partials after them (the quantized prefix of the rows), then merge."""
    bsz, hq, d = q.shape
    hkv, max_blocks = block_tables.shape[1:]
    group, bs = hq // hkv, k_pool.shape[1]
    selected = selected_blocks is not None
    block_n, num_warps, num_stages = _launch_config(q.dtype, d)
    if out is None:
        out = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device)
    total = num_splits + extra_splits
    if total == 1:  # the kernel normalises and writes out itself; no partials, no merge
        part, lse = out, out
        part_strides, lse_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        part = torch.empty(bsz, hq, total, d, dtype=torch.float32, device=q.device)  # [B, Hq, S, D]
        lse = torch.empty(bsz, hq, total, dtype=torch.float32, device=q.device)  # [B, Hq, S]
        part_strides, lse_strides = part.stride()[:3], lse.stride()[:2]
    sel, nsel = (selected_blocks, num_selected) if selected else (block_tables, lengths)  # dummies when unused
    first = starts if starts is not None else lengths  # a dummy when unused
    with torch.cuda.device(q.device):
        _paged_decode_kernel[(bsz, hkv, num_splits)](
            q, k_pool, v_pool, block_tables, lengths, sel, nsel, part, lse, first,
            float(scale), float(softcap or 0.0), max_blocks, sel.shape[2], 0,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            block_tables.stride(0), block_tables.stride(1), lengths.stride(0), lengths.stride(1),
            sel.stride(0), sel.stride(1), nsel.stride(0), nsel.stride(1), *part_strides, *lse_strides,
            first.stride(0), first.stride(1), G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=bs, BLOCK_N=block_n,
            HAS_SOFTCAP=bool(softcap), HAS_SELECTED=selected, SINGLE_SPLIT=total == 1,
            IEEE=q.dtype == torch.float32, HAS_START=starts is not None, num_warps=num_warps, num_stages=num_stages,
        )
        if extra_splits:
            extra_launch(part, lse, num_splits)
        if total > 1:
            _merge_splits_kernel[(bsz, hq)](
                part, lse, out, total, *part_strides, *lse_strides, out.stride(0), out.stride(1),
                HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=triton.next_power_of_2(total),
            )
    return out
