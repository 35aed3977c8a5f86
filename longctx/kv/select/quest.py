"""``quest``: read the pages whose key bounds promise the largest q·k (Tang et al., arXiv:2406.10774).

Each page (``page`` tokens: one or more pool blocks) is summarised by the elementwise min and max of its keys
(``kv.select.summaries``: maintained as rows grow, refreshed after compaction and quantization). For a query q
the page's upper bound on q·k is ``sum_d max(q_d * min_d, q_d * max_d)``, computed as two matmuls
(``q⁺ · max + q⁻ · min``). Per kv-head row the bound is the largest over the query heads of its GQA group
(Quest is defined per attention head; a kv-head serves all its group's heads, so a page counts if any of them
may attend to it). The row reads its top pages by bound, always including the first page (attention sinks)
and the newest page; ties go to the earlier page (the same choice on CPU and CUDA). With one block per page
(the default) the choice is one kernel per layer on CUDA (``attention.triton.top_pages``: the pages in index
order, and the bytes the row reads added to the step's counter). The first
``dense_layers`` layers read everything, as in the paper (their attention is not sparse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.attention.triton.quest_bound import quest_bound
from longctx.attention.triton.top_pages import top_indices, top_pages
from longctx.kv.registry import param, register
from longctx.kv.select.base import PagedRows, Selection, SelectPolicy, SelectState


@register("select", "quest")
@dataclass(frozen=True)
class Quest(SelectPolicy):
    """Per page, key min/max; read the pages whose upper bound on q·k is highest (plus sink and newest)."""

    page: int = param(16, "page size in tokens: a multiple of the KV block size")
    tokens: int = param(1024, "tokens each row reads per step, rounded up to whole pages (unless pages is set)")
    pages: int = param(0, "pages each row reads per step (0: from tokens)")
    dense_layers: int = param(2, "the first layers read every token (the paper skips the first two)")

    needs_block_summaries = True

    def __post_init__(self) -> None:
        if self.page < 1:
            raise ValueError(f"page must be >= 1, got {self.page}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if self.pages < 0 or self.pages == 1:
            raise ValueError(f"pages must be 0 (from tokens) or >= 2 (sink and newest page), got {self.pages}")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")

    @property
    def num_pages(self) -> int:
        return self.pages or max(2, -(-self.tokens // self.page))

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        bs = rows.block_size
        if self.page % bs:
            raise ValueError(f"quest page={self.page} must be a multiple of the KV block size {bs}")
        m = self.page // bs
        bsz, h, cap = rows.block_tables.shape
        total_pages = -(-cap // m)
        if layer < self.dense_layers or self.num_pages >= total_pages:
            return None  # the budget covers every row of this step: read everything
        assert rows.summaries is not None, "quest needs block summaries (pool.summary)"
        if m == 1:  # two kernels on CUDA (the bound, then the choice: attention.triton), torch twins elsewhere
            bound = quest_bound(q, rows.summaries, rows.block_tables, rows.lengths, bs, force_ends=True)
            blocks, num = top_pages(bound, rows.lengths, self.num_pages, bs, state.read_acc,
                                    token_bytes=rows.token_bytes,
                                    block_bytes=rows.summary_bytes_per_block)
            return Selection(blocks=blocks, num_blocks=num, counted=state.read_acc is not None)
        nblk = rows.num_row_blocks  # [B, H]
        npages = (nblk + m - 1) // m  # [B, H]
        tables = rows.block_tables.long()
        inside = torch.arange(cap, device=tables.device)[None, None, :] < nblk[:, :, None]  # [B, H, cap]
        idx = torch.where(inside, tables, 0)
        kmin = _pages(rows.summaries[:, 0][idx].float(), inside, m, True)
        kmax = _pages(rows.summaries[:, 1][idx].float(), inside, m, False)
        qg = q.view(bsz, h, -1, q.shape[-1]).float()  # [B, H, G, D]
        bound = (qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)).amax(2)
        j = torch.arange(total_pages, device=q.device)[None, None, :]
        bound = bound.masked_fill(j >= npages[:, :, None], float("-inf"))
        bound = bound.masked_fill((j == 0) | (j == npages[:, :, None] - 1), float("inf"))
        order = top_indices(bound, self.num_pages)  # [B, H, S]
        chosen = npages.clamp(max=self.num_pages)
        blocks = (order[..., None] * m + torch.arange(m, device=order.device)).flatten(2)
        return Selection(blocks=blocks, num_blocks=chosen * m)

    def tokens_read(self, rows: PagedRows, selection: Selection | None) -> Tensor:
        """Every selected page is full but the newest (always selected), which lacks ``pages * page - length``
        tokens: the count of :func:`row_token_count` in a few kernels."""
        if selection is None:
            return rows.lengths.long()
        assert selection.num_blocks is not None
        bs, m = rows.block_size, self.page // rows.block_size
        npages = (rows.num_row_blocks + m - 1) // m
        return selection.num_blocks * bs - (npages * (m * bs) - rows.lengths.long())

    def extra_bytes_read(self, layer: int, rows: PagedRows, state: SelectState) -> Tensor | None:
        """The block summaries of each row (read to rank its pages)."""
        if layer < self.dense_layers or rows.summaries is None or self.num_pages >= -(-rows.block_tables.shape[-1]
                                                                                    // (self.page // rows.block_size)):
            return None
        return rows.num_row_blocks.long() * rows.summary_bytes_per_block


def _pages(x: Tensor, inside: Tensor, m: int, low: bool) -> Tensor:
    """Reduce block summaries x [B, H, cap, D] to pages of m blocks (min if ``low``, else max); blocks outside
    the row are ignored, a page with none is zero."""
    bsz, h, cap, d = x.shape
    big = torch.finfo(x.dtype).max
    fill = big if low else -big
    x = torch.nn.functional.pad(x.masked_fill(~inside[..., None], fill), (0, 0, 0, -cap % m), value=fill)
    x = x.view(bsz, h, -1, m, d)
    out = x.amin(3) if low else x.amax(3)
    return out.masked_fill(out.abs() == big, 0.0)
