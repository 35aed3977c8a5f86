"""Varlen paged prefill attention: the prompt chunks of several sequences over their rows in the block pool.

The chunk of sequence s is ``q[cu_seqlens[s]:cu_seqlens[s+1]]`` (n_s tokens, rotated, packed with the other
chunks); its K/V were already appended to every row of s, so they are the last n_s tokens of each row
(``kv/rows.py``: a row holds its tokens in position order in blocks of ``block_size``; a compressed row holds
fewer older tokens, and rows of one sequence can differ in length). Query i of the chunk sits at index
``lengths[s, h] - n_s + i`` of row (s, h) and attends to the row's tokens up to that index (causal), reading
them where they lie in the pool: no row is copied out. Query head j reads kv row j // G (GQA). With a sliding
``window`` (and the positions of the pool's tokens and of the queries) a query also drops keys whose original
position is ``window`` or more behind its own.

Three pieces (``STYLE.md``): :func:`paged_prefill_attention_ref` (readable torch, the oracle),
``_paged_prefill_kernel`` (Triton: one program per tile of chunk tokens x one kv head with all its query
heads, an online softmax over the row's blocks up to the tile's last query), and
:func:`paged_prefill_attention` (checks, launch).

Status: the kernel equals the twin under Triton's interpreter on the CPU (fp32 cases of ``check_prefill.py``);
``scripts/gpu_check.py`` runs every case on the GPU (``attention/triton/check.py``), which has not happened yet.
The engine uses it only when ``LONGCTX_PAGED_PREFILL=1`` (``engine/paged_prefill.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.attention.triton.paged_decode import HAS_TRITON, KERNEL_DTYPES, triton
from longctx.device import to_device

if HAS_TRITON:
    import triton.language as tl


# ---- reference ------------------------------------------------------------------------------------------------
def paged_prefill_attention_ref(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor, cu_seqlens: Tensor,
    scale: float, softcap: float | None = None, window: int | None = None, pos_pool: Tensor | None = None,
    q_pos: Tensor | None = None,
) -> Tensor:
    """Causal attention of packed prompt chunks over paged rows, one row at a time in plain torch (fp32; fp64
    for fp64 inputs).

    q [T, Hq, D] (rotated; T = cu_seqlens[-1]), k_pool/v_pool [num_blocks, block_size, D], block_tables
    [S, Hkv, max_blocks] int, lengths [S, Hkv] int (row lengths, the chunk included), cu_seqlens [S + 1] int
    (chunk offsets into q). ``window`` needs ``pos_pool`` [num_blocks, block_size] and ``q_pos`` [T] (original
    positions). Logits are ``q·k * scale``, soft-capped as ``softcap * tanh(logits / softcap)`` when set.
    Returns out [T, Hq, D] in q's dtype.
    """
    _check_shapes(q, k_pool, v_pool, block_tables, lengths, cu_seqlens, softcap, window, pos_pool, q_pos)
    t_total, hq, d = q.shape
    nseq, hkv = lengths.shape
    group, bs = hq // hkv, k_pool.shape[1]
    k_flat, v_flat = k_pool.reshape(-1, d), v_pool.reshape(-1, d)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(t_total, hq, d, dtype=acc, device=q.device)
    cu = [int(x) for x in cu_seqlens]
    for s in range(nseq):
        lo, hi = cu[s], cu[s + 1]
        n = hi - lo
        if n == 0:
            continue
        for h in range(hkv):
            length = int(lengths[s, h])
            if length < n:
                raise ValueError(f"row ({s}, {h}) holds {length} tokens, fewer than its chunk of {n}")
            if length > block_tables.shape[2] * bs:
                raise ValueError(f"row ({s}, {h}) has {length} tokens but only {block_tables.shape[2]} blocks")
            tok = torch.arange(length, device=q.device)
            slots = block_tables[s, h, tok // bs].long() * bs + tok % bs
            k, v = k_flat[slots].to(acc), v_flat[slots].to(acc)  # [L, D]
            heads = slice(h * group, (h + 1) * group)
            logits = q[lo:hi, heads].to(acc).transpose(0, 1) @ k.T * scale  # [G, n, L]
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            rows = length - n + torch.arange(n, device=q.device)  # each query's index in the row
            visible = tok[None, :] <= rows[:, None]  # [n, L]
            if window is not None:
                assert pos_pool is not None and q_pos is not None
                kpos = pos_pool.reshape(-1)[slots]
                visible = visible & (q_pos[lo:hi, None] - kpos[None, :] < window)
            logits = logits.masked_fill(~visible, float("-inf"))
            out[lo:hi, heads] = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1)
    return out.to(q.dtype)


# ---- kernel -----------------------------------------------------------------------------------------------------
if HAS_TRITON:
    from longctx.attention.triton.paged_decode import _online_softmax_step, _tanh

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, qpos_ptr, table_ptr, len_ptr, cu_ptr, tile_seq_ptr, tile_start_ptr, o_ptr,
        scale, softcap, window,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt, stride_pb,
        stride_tb, stride_th, stride_lb, stride_lh, stride_ot, stride_oh,
        G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """One program: BLOCK_M chunk tokens of one sequence (a tile) for the G query heads of one kv head (rows
        r of the program's tile: token r // G_PAD, head r % G_PAD, so each K/V tile is read once for the whole
        group), over the kv row up to the tile's last query; causal (and windowed) per query."""
        LOG2E: tl.constexpr = 1.4426950408889634
        tile, kvh = tl.program_id(0), tl.program_id(1)
        s = tl.load(tile_seq_ptr + tile)
        t0 = tl.load(tile_start_ptr + tile)
        q_lo = tl.load(cu_ptr + s)
        q_hi = tl.load(cu_ptr + s + 1)
        length = tl.load(len_ptr + s * stride_lb + kvh * stride_lh)
        offs_r = tl.arange(0, BLOCK_M * G_PAD)
        offs_m = t0 + offs_r // G_PAD  # packed token index of each tile row
        heads = kvh * G + offs_r % G_PAD  # its query head
        m_mask = (offs_m < q_hi) & (offs_r % G_PAD < G)
        rows = length - (q_hi - q_lo) + (offs_m - q_lo)  # each query's index in the row
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + offs_m[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M * G_PAD, BLOCK_D]
        if HAS_WINDOW:
            qpos = tl.load(qpos_ptr + offs_m, mask=m_mask, other=0)
        end = tl.minimum(length, length - (q_hi - q_lo) + (tl.minimum(t0 + BLOCK_M, q_hi) - q_lo))
        table_row = table_ptr + s * stride_tb + kvh * stride_th
        offs_n = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M * G_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * G_PAD, BLOCK_D], tl.float32)
        for p0 in range(0, end, BLOCK_N):
            p = p0 + offs_n
            valid = p < end
            block_id = tl.load(table_row + p // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            slot = p % BLOCK_SIZE
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + (block_id * stride_kb + slot * stride_kt)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptr + (block_id * stride_vb + slot * stride_vt)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))  # [BLOCK_M * G_PAD, BLOCK_N] fp32
            sc = sc * scale
            if HAS_SOFTCAP:
                sc = softcap * _tanh(sc / softcap)
            visible = valid[None, :] & (p[None, :] <= rows[:, None]) & m_mask[:, None]
            if HAS_WINDOW:
                kpos = tl.load(pos_ptr + block_id * stride_pb + slot, mask=valid, other=0)
                visible = visible & (qpos[:, None] - kpos[None, :] < window)
            sc = tl.where(visible, sc * LOG2E, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(sc, v, m_i, l_i, acc, IEEE)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + offs_m[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ---- checks and launch ----------------------------------------------------------------------------------------
def _check_shapes(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                  cu_seqlens: Tensor, softcap: float | None, window: int | None, pos_pool: Tensor | None,
                  q_pos: Tensor | None) -> None:
    if q.dim() != 3 or k_pool.dim() != 3 or v_pool.shape != k_pool.shape or k_pool.shape[2] != q.shape[2]:
        raise ValueError(f"q must be [T, Hq, D] and k_pool = v_pool [num_blocks, block_size, D], got "
                         f"{tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if block_tables.dim() != 3 or lengths.dim() != 2 or tuple(block_tables.shape[:2]) != tuple(lengths.shape):
        raise ValueError(f"block_tables must be [S, Hkv, max_blocks] and lengths [S, Hkv], got "
                         f"{tuple(block_tables.shape)} and {tuple(lengths.shape)}")
    nseq, hkv = lengths.shape
    if hkv < 1 or q.shape[1] % hkv:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {hkv}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != nseq + 1:
        raise ValueError(f"cu_seqlens must be [S + 1] = [{nseq + 1}], got {tuple(cu_seqlens.shape)}")
    for name, t in (("block_tables", block_tables), ("lengths", lengths), ("cu_seqlens", cu_seqlens)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap must be positive (or None/0 for none), got {softcap}")
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be >= 1 (or None), got {window}")
        if pos_pool is None or q_pos is None:
            raise ValueError("a window needs pos_pool (positions of the pool's tokens) and q_pos (of the queries)")
        if tuple(pos_pool.shape) != tuple(k_pool.shape[:2]) or tuple(q_pos.shape) != (q.shape[0],):
            raise ValueError(f"pos_pool must be [num_blocks, block_size] = {tuple(k_pool.shape[:2])} and q_pos "
                             f"[T] = [{q.shape[0]}], got {tuple(pos_pool.shape)} and {tuple(q_pos.shape)}")


def prefill_tiles(cu_seqlens: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """(sequence, first packed token) of every ``block_m``-token tile of every chunk, from host offsets."""
    seq, start = [], []
    for s in range(len(cu_seqlens) - 1):
        for t0 in range(cu_seqlens[s], cu_seqlens[s + 1], block_m):
            seq.append(s)
            start.append(t0)
    return seq, start


def paged_prefill_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor, cu_seqlens: list[int],
    scale: float, softcap: float | None = None, window: int | None = None, pos_pool: Tensor | None = None,
    q_pos: Tensor | None = None, *, out: Tensor | None = None, block_m: int = 64, block_n: int = 32,
) -> Tensor:
    """Triton varlen paged prefill; same arguments and result as :func:`paged_prefill_attention_ref`, but
    ``cu_seqlens`` as host ints (the tiles are laid out on the host and uploaded with the offsets in one
    copy that does not wait for the device). Needs Triton and CUDA
    tensors (or ``TRITON_INTERPRET=1``): q, k_pool, v_pool of one dtype (fp32/fp16/bf16), int32 block_tables
    and lengths, int64 pos_pool / q_pos; ``lengths[s, h]`` must fit the table (<= max_blocks * block_size; not
    checked, that would need a device sync). ``out`` [T, Hq, D] receives the result. One program per (tile, kv
    head) with ``block_m`` query rows: ``block_m // G`` chunk tokens (G padded to a power of two) with all G
    query heads of the kv head, so each K/V tile is read once per group."""
    _check_shapes(q, k_pool, v_pool, block_tables, lengths, torch.tensor(cu_seqlens), softcap, window, pos_pool,
                  q_pos)
    if cu_seqlens[-1] != q.shape[0] or any(b < a for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {q.shape[0]}, got {cu_seqlens}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, contiguous in its last dimension")
    if not HAS_TRITON:
        raise RuntimeError("paged_prefill_attention needs Triton, which is not installed; "
                           "use paged_prefill_attention_ref instead")
    if q.dtype not in KERNEL_DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"q, k_pool and v_pool must share one dtype of {KERNEL_DTYPES}, got {q.dtype}, "
                         f"{k_pool.dtype}, {v_pool.dtype}")
    for name, t in (("block_tables", block_tables), ("lengths", lengths)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool must be contiguous in their last dimension")
    t_total, hq, d = q.shape
    hkv = lengths.shape[1]
    out = torch.empty_like(q) if out is None else out
    if t_total == 0:
        return out
    group = hq // hkv
    g_pad = triton.next_power_of_2(group)
    tokens = max(1, block_m // g_pad)  # chunk tokens per program: block_m query rows, all G heads of each
    tile_seq, tile_start = prefill_tiles(cu_seqlens, tokens)
    # offsets and tiles in one upload, from pinned memory: no wait for the device (to_device)
    meta = to_device(torch.tensor(cu_seqlens + tile_seq + tile_start, dtype=torch.int32), q.device)
    ntiles = len(tile_seq)
    cu = meta[: len(cu_seqlens)]
    seq_t, start_t = meta[len(cu_seqlens) : len(cu_seqlens) + ntiles], meta[len(cu_seqlens) + ntiles :]
    has_window = window is not None
    pos = pos_pool if has_window else lengths  # placeholders: never read without a window
    qpos = q_pos if has_window else lengths
    _paged_prefill_kernel[(ntiles, hkv)](
        q, k_pool, v_pool, pos, qpos, block_tables, lengths, cu, seq_t, start_t, out,
        scale, float(softcap or 0.0), int(window or 0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        pos.stride(0) if has_window else 0,
        block_tables.stride(0), block_tables.stride(1), lengths.stride(0), lengths.stride(1),
        out.stride(0), out.stride(1),
        G=group, G_PAD=g_pad, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=k_pool.shape[1],
        BLOCK_M=tokens, BLOCK_N=block_n, HAS_SOFTCAP=bool(softcap), HAS_WINDOW=has_window,
        IEEE=q.dtype == torch.float32,
    )
    return out
