"""Decode attention over a :class:`~longctx.kv.select.base.Selection`, and the adapter that lets the
per-sequence path run select methods on its gathered rows.

- :func:`attend_selection`: a block selection on CUDA goes through the paged decode kernel's selected-blocks
  path (``attention.triton.paged_decode``); everything else (token selections, importance weights, CPU)
  through :func:`attend_tokens`, a vectorised torch gather of just the selected slots — the twin the kernel
  path is checked against (``scripts/gpu_check.py``).
- :func:`dense_as_paged`: one sequence's gathered rows [H, L, D] viewed as a pool of H * ceil(L / bs) blocks
  with identity block tables, plus their exact block summaries, so the per-sequence path selects with the
  same code as the batched step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.kv.select.base import PagedRows, Selection
from longctx.kv.select.summaries import block_summaries_dense


def blocks_to_tokens(rows: PagedRows, selection: Selection) -> Tensor:
    """[B, H, S * block_size] token indices (-1 = none) of a block selection."""
    assert selection.blocks is not None and selection.num_blocks is not None
    bs = rows.block_size
    s = selection.blocks.shape[-1]
    taken = torch.arange(s, device=selection.blocks.device)[None, None, :] < selection.num_blocks[:, :, None]
    tok = selection.blocks[..., None] * bs + torch.arange(bs, device=selection.blocks.device)  # [B, H, S, bs]
    ok = taken[..., None] & (tok < rows.lengths[:, :, None, None])
    return torch.where(ok, tok, -1).flatten(2)


def attend_tokens(q: Tensor, rows: PagedRows, tokens: Tensor, scale: float, softcap: float | None = None,
                  log_weights: Tensor | None = None) -> Tensor:
    """Attention of q [B, Hq, D] over the tokens [B, H, K] (-1 = none) of each row -> [B, Hq, D] in q's dtype.

    Only the selected slots are read from the pool. A row that selects nothing gives zeros."""
    bsz, hq, d = q.shape
    h, bs = tokens.shape[1], rows.block_size
    valid = tokens >= 0
    tok = tokens.clamp(min=0)
    blocks = rows.block_tables.long().gather(-1, tok // bs)  # [B, H, K]
    slots = blocks * bs + tok % bs
    k = rows.k.reshape(-1, d)[slots].float()  # [B, H, K, D]
    v = rows.v.reshape(-1, d)[slots].float()
    qg = q.view(bsz, h, hq // h, d).float()  # [B, H, G, D]
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, H, G, K]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if log_weights is not None:
        logits = logits + log_weights
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return torch.matmul(p, v).reshape(bsz, hq, d).to(q.dtype)


def attend_selection(q: Tensor, rows: PagedRows, selection: Selection | None, scale: float,
                     softcap: float | None, attention_fn) -> Tensor:  # noqa: ANN001
    """Decode attention of q [B, Hq, D] over what ``selection`` picks (None: every token, through
    ``attention_fn``, the step's paged decode attention), with the selection's residual mix."""
    out = _attend(q, rows, selection, scale, softcap, attention_fn)
    if selection is None or selection.residual_weight is None:
        return out
    assert selection.residual_value is not None
    bsz, hq, d = q.shape
    h = selection.residual_value.shape[1]
    w = selection.residual_weight.reshape(bsz, hq, 1)
    value = selection.residual_value[:, :, None, :].expand(bsz, h, hq // h, d).reshape(bsz, hq, d).float()
    return ((1 - w) * out.float() + w * value).to(q.dtype)


def _attend(q: Tensor, rows: PagedRows, selection: Selection | None, scale: float, softcap: float | None,
            attention_fn) -> Tensor:  # noqa: ANN001
    if selection is None:
        return attention_fn(q, rows.k, rows.v, rows.block_tables, rows.lengths, scale, softcap)
    if selection.blocks is not None:
        if q.device.type == "cuda":
            from longctx.attention.triton import paged_decode  # noqa: PLC0415

            if paged_decode.HAS_TRITON:
                return paged_decode.paged_decode_attention(
                    q, rows.k, rows.v, rows.block_tables.to(torch.int32), rows.lengths.to(torch.int32), scale, softcap,
                    selected_blocks=selection.blocks.to(torch.int32), num_selected=selection.num_blocks.to(torch.int32))
        return attend_tokens(q, rows, blocks_to_tokens(rows, selection), scale, softcap)
    assert selection.tokens is not None
    return attend_tokens(q, rows, selection.tokens, scale, softcap, selection.log_weights)


def dense_as_paged(k: Tensor, v: Tensor, pos: Tensor, lengths: Tensor, block_size: int,
                   summaries: bool, table_width: int = 0) -> PagedRows:
    """Gathered rows of one sequence (k/v [H, L, D], pos [H, L], lengths [H]) as a B = 1 :class:`PagedRows`
    whose block tables are at least ``table_width`` wide (the batched step's table capacity, so that methods
    deciding by the table's width decide alike on both paths)."""
    h, length, d = k.shape
    nb = max(1, -(-length // block_size), table_width)
    pad = nb * block_size - length
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        pos = torch.nn.functional.pad(pos, (0, pad))
    kp = k.reshape(h * nb, block_size, d)
    tables = torch.arange(h * nb, device=k.device).view(1, h, nb)
    lens = lengths.view(1, h).long()
    rows = PagedRows(kp, v.reshape(h * nb, block_size, d), pos.reshape(h * nb, block_size), tables, lens)
    if summaries:
        rows.summaries = block_summaries_dense(kp, lens.view(h, 1).expand(h, nb).reshape(-1)
                                               - torch.arange(nb, device=k.device).repeat(h) * block_size)
    return rows
