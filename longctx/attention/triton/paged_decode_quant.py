"""Paged decode attention over rows with a KIVI-quantized prefix (``quant=int8`` / ``int4``), dequantized in the kernel.

A quantized row (``kv/rows.py``) is a prefix of quantized blocks of ``QBS`` tokens in a
:class:`~longctx.kv.pool.QuantBlockPool` followed by ordinary fp blocks. Keys are quantized per channel over
groups of ``group`` tokens, values per token over groups of ``value_group`` channels (``kv/quant/kivi.py``:
``x = code * scale + zero``, fp16 scales and zeros, int4 codes two per byte, even channel in the low nibble);
a token dropped by eviction inside the prefix stays in its block, marked dead in ``alive``.

Three pieces (``STYLE.md``): :func:`paged_decode_quant_ref` (plain torch: dequantize with the codec's own
functions, concatenate with the fp tokens, softmax; the oracle), ``_quant_decode_kernel`` (Triton: one program
per (sequence, kv row, split of the row's quantized blocks), dequantizing a block's codes in registers to the
query dtype, as the reference does, writing a partial output and its log-sum-exp), and
:func:`paged_decode_attention_quant`, which runs the fp kernel of ``paged_decode`` over the fp suffix and this
kernel over the prefix into one set of partials and merges them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.triton import paged_decode as fp
from longctx.kv.quant.kivi import dequantize_keys, dequantize_values, unpack_int4


@dataclass
class QuantRows:
    """The quantized prefixes of a batch's rows (NQ pool blocks of QBS tokens; W = D * bits / 8 code bytes).

    data: k_codes [NQ, QBS, W] uint8, k_scale / k_zero [NQ, QBS // group, D] fp16, v_codes [NQ, QBS, W] uint8,
    v_scale / v_zero [NQ, QBS, D // value_group] fp16; alive [NQ, QBS] bool; tables [B, Hkv, max_q] int32
    (pool block ids of each row's quantized blocks, in order); num_blocks [B, Hkv] int32.
    """

    data: dict[str, Tensor]
    alive: Tensor
    tables: Tensor
    num_blocks: Tensor
    bits: int
    group: int
    value_group: int


def paged_decode_quant_ref(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                           scale: float, quant: QuantRows) -> Tensor:
    """Decode attention over each row's live quantized tokens followed by its ``lengths`` fp tokens (fp32).

    q [B, Hq, D] (rotated); k_pool / v_pool / block_tables / lengths as in ``paged_decode_attention_ref`` (the fp
    suffix). Returns out [B, Hq, D] in q's dtype.
    """
    bsz, hq, d = q.shape
    hkv = block_tables.shape[1]
    group, bs = hq // hkv, k_pool.shape[1]
    k_flat, v_flat = k_pool.reshape(-1, d), v_pool.reshape(-1, d)
    out = torch.zeros(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hkv):
            ids = quant.tables[b, h, : int(quant.num_blocks[b, h])].long()
            kc, vc = quant.data["k_codes"][ids], quant.data["v_codes"][ids]
            if quant.bits == 4:
                kc, vc = unpack_int4(kc), unpack_int4(vc)
            kq = dequantize_keys(kc, quant.data["k_scale"][ids], quant.data["k_zero"][ids], quant.group, q.dtype)
            vq = dequantize_values(vc, quant.data["v_scale"][ids], quant.data["v_zero"][ids], quant.value_group,
                                   q.dtype)
            alive = quant.alive[ids].reshape(-1)
            n = int(lengths[b, h])
            tok = torch.arange(n, device=q.device)
            slots = block_tables[b, h, tok // bs].long() * bs + tok % bs
            k = torch.cat([kq.reshape(-1, d)[alive], k_flat[slots]]).float()  # [n_live + n, D]
            v = torch.cat([vq.reshape(-1, d)[alive], v_flat[slots]]).float()
            if k.shape[0] == 0:
                continue
            heads = slice(h * group, (h + 1) * group)
            s = q[b, heads].float() @ k.T * scale
            out[b, heads] = torch.softmax(s, dim=-1) @ v
    return out.to(q.dtype)


if fp.HAS_TRITON:
    import triton
    import triton.language as tl

    from longctx.attention.triton.paged_decode import _online_softmax_step

    @triton.jit
    def _codes(ptr, rows, offs_d, W: tl.constexpr, BITS: tl.constexpr, d_mask):
        """[len(rows), BLOCK_D] codes (as fp32) of the given token rows of a block's code matrix [QBS, W]."""
        if BITS == 8:
            c = tl.load(ptr + rows[:, None] * W + offs_d[None, :], mask=d_mask[None, :], other=0)
        else:
            byte = tl.load(ptr + rows[:, None] * W + (offs_d // 2)[None, :], mask=d_mask[None, :], other=0)
            c = (byte >> ((offs_d % 2) * 4).to(tl.uint8)[None, :]) & 15
        return c.to(tl.float32)

    @triton.jit
    def _quant_decode_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, alive_ptr, table_ptr, nq_ptr, o_ptr, lse_ptr,
        scale, split_offset,
        stride_qb, stride_qh, stride_tb, stride_th, stride_nb, stride_nh, stride_ob, stride_oh, stride_os,
        stride_eb, stride_eh,
        G: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QBS: tl.constexpr,
        W: tl.constexpr, BITS: tl.constexpr, KGROUP: tl.constexpr, VGROUP: tl.constexpr, IEEE: tl.constexpr,
    ):
        """Program (b, h, s): the G query heads of kv row (b, h) over split s of the row's quantized blocks."""
        LOG2E: tl.constexpr = 1.4426950408889634
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        nq = tl.load(nq_ptr + b * stride_nb + h * stride_nh)
        per_split = tl.cdiv(nq, tl.num_programs(2))
        start = split * per_split
        end = tl.minimum(start + per_split, nq)
        offs_g, offs_d, offs_t = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D), tl.arange(0, QBS)
        g_mask, d_mask = offs_g < G, offs_d < HEAD_DIM
        heads = h * G + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
        dtype = q_ptr.dtype.element_ty
        m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for j in range(start, end):
            blk = tl.load(table_ptr + b * stride_tb + h * stride_th + j).to(tl.int64)
            alive = tl.load(alive_ptr + blk * QBS + offs_t).to(tl.int1)  # [QBS]
            kc = _codes(kc_ptr + blk * QBS * W, offs_t, offs_d, W, BITS, d_mask)  # [QBS, BLOCK_D]
            kidx = (offs_t // KGROUP)[:, None] * HEAD_DIM + offs_d[None, :]
            kmask = d_mask[None, :] & (offs_t >= 0)[:, None]
            ks = tl.load(ks_ptr + blk * (QBS // KGROUP) * HEAD_DIM + kidx, mask=kmask, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + blk * (QBS // KGROUP) * HEAD_DIM + kidx, mask=kmask, other=0.0).to(tl.float32)
            k = (kc * ks + kz).to(dtype)  # dequantized to the query dtype, as the reference does
            vc = _codes(vc_ptr + blk * QBS * W, offs_t, offs_d, W, BITS, d_mask)
            vidx = offs_t[:, None] * (HEAD_DIM // VGROUP) + (offs_d // VGROUP)[None, :]
            vs = tl.load(vs_ptr + blk * QBS * (HEAD_DIM // VGROUP) + vidx, mask=kmask, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + blk * QBS * (HEAD_DIM // VGROUP) + vidx, mask=kmask, other=0.0).to(tl.float32)
            v = (vc * vs + vz).to(dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))  # [BLOCK_H, QBS]
            s = tl.where(alive[None, :], s * scale * LOG2E, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_offs = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] + (split_offset + split) * stride_os
        tl.store(o_ptr + o_offs, o, mask=g_mask[:, None] & d_mask[None, :])
        lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) / LOG2E, float("-inf"))
        tl.store(lse_ptr + b * stride_eb + heads * stride_eh + split_offset + split, lse, mask=g_mask)


def _check_quant(q: Tensor, quant: QuantRows, block_tables: Tensor) -> None:
    bsz, hkv = block_tables.shape[:2]
    d = q.shape[2]
    kc = quant.data["k_codes"]
    if quant.bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {quant.bits}")
    qbs, w = kc.shape[1:]
    if w != d * quant.bits // 8:
        raise ValueError(f"k_codes rows of {w} bytes do not hold {d} channels of {quant.bits} bits")
    if qbs < 16 or qbs & (qbs - 1) or qbs % quant.group or d % quant.value_group:
        raise ValueError(f"quantized blocks of {qbs} tokens (a power of two >= 16, whole key groups of "
                         f"{quant.group}) and value groups of {quant.value_group} on head_dim {d} are required")
    if tuple(quant.tables.shape[:2]) != (bsz, hkv) or tuple(quant.num_blocks.shape) != (bsz, hkv):
        raise ValueError(f"quant tables must be [B, Hkv, max_q] and num_blocks [B, Hkv] with [B, Hkv] = "
                         f"{(bsz, hkv)}, got {tuple(quant.tables.shape)} and {tuple(quant.num_blocks.shape)}")
    for name, t in (("tables", quant.tables), ("num_blocks", quant.num_blocks)):
        if t.dtype != torch.int32:
            raise ValueError(f"quant.{name} must be int32, got {t.dtype}")
    for name, t in (*quant.data.items(), ("alive", quant.alive)):
        if not t.is_contiguous() or t.device != q.device:
            raise ValueError(f"quant {name} must be contiguous and on {q.device}")


def paged_decode_attention_quant(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                                 scale: float, quant: QuantRows, *, num_splits: int | None = None,
                                 quant_splits: int | None = None, out: Tensor | None = None) -> Tensor:
    """Triton version of :func:`paged_decode_quant_ref` (CUDA tensors; same argument rules as
    ``paged_decode_attention``). ``quant_splits`` programs per row share its quantized blocks (default: as
    many as keep every SM busy, from the width of ``quant.tables``); no host synchronisation."""
    fp._check_shapes(q, k_pool, v_pool, block_tables, lengths, None, None, None)
    fp._check_kernel_args(q, k_pool, v_pool, block_tables, lengths, None, None, out)
    _check_quant(q, quant, block_tables)
    if not fp.HAS_TRITON or not q.is_cuda:
        raise RuntimeError("paged_decode_attention_quant needs Triton and CUDA tensors; "
                           "use paged_decode_quant_ref instead")
    bsz, hq, d = q.shape
    hkv, max_blocks = block_tables.shape[1:]
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    sms = fp._num_sms(index)
    if num_splits is None:
        num_splits = fp.default_num_splits(bsz * hkv, max_blocks * k_pool.shape[1], sms)
    qbs = quant.data["k_codes"].shape[1]
    if quant_splits is None:
        quant_splits = fp.default_num_splits(bsz * hkv, quant.tables.shape[2] * qbs, sms)
    quant_splits = max(1, min(quant_splits, fp.MAX_SPLITS - num_splits))
    group = hq // hkv
    dt = quant.data

    def launch(part: Tensor, lse: Tensor, offset: int) -> None:
        _quant_decode_kernel[(bsz, hkv, quant_splits)](
            q, dt["k_codes"], dt["k_scale"], dt["k_zero"], dt["v_codes"], dt["v_scale"], dt["v_zero"],
            quant.alive.view(torch.uint8), quant.tables, quant.num_blocks, part, lse, float(scale), offset,
            q.stride(0), q.stride(1), quant.tables.stride(0), quant.tables.stride(1), quant.num_blocks.stride(0),
            quant.num_blocks.stride(1), *part.stride()[:3], *lse.stride()[:2],
            G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
            BLOCK_D=max(16, triton.next_power_of_2(d)), QBS=qbs, W=dt["k_codes"].shape[2], BITS=quant.bits,
            KGROUP=quant.group, VGROUP=quant.value_group, IEEE=q.dtype == torch.float32, num_warps=4,
        )

    return fp.launch_with_partials(q, k_pool, v_pool, block_tables, lengths, scale, None, None, None, num_splits,
                                   out, extra_splits=quant_splits, extra_launch=launch)
