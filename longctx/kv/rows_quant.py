"""The quantized prefix of rows (``quant=int8`` / ``int4``): gathering it dequantized, compacting inside it,
dequantizing back, and :meth:`QuantizedPrefix.settle`, which quantizes the oldest fp tokens of each row.

:class:`QuantizedPrefix` is a part of :class:`~longctx.kv.rows.RowSet` (its base class), kept apart because it
is a job of its own: the fp rows (growth, block tables, cuts) live in ``rows.py``; the layout of a quantized row
is described there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from longctx.kv.pool import BlockPool, QuantBlockPool
from longctx.kv.row_view import QuantCodec, RowView


class QuantizedPrefix:
    """Quantized-prefix operations of a row set; the attributes are :class:`~longctx.kv.rows.RowSet`'s."""

    pool: BlockPool
    qpool: QuantBlockPool | None
    quant: QuantCodec | None
    quant_block_size: int
    num_kv_heads: int
    blocks: list[list[list[int]]]
    qblocks: list[list[list[int]]]
    qlens: list[list[int]]
    lengths: list[list[int]]
    _cache: dict[str, Any]
    # and RowSet's methods fp_lengths, _slot_table, mark_changed

    def _gather_quantized(self, layer: int) -> RowView:
        assert self.quant is not None and self.qpool is not None
        pool, qp, qbs = self.pool, self.qpool, self.quant_block_size
        h, d, dev = self.num_kv_heads, pool.head_dim, pool.device
        lengths = torch.tensor(self.lengths[layer], dtype=torch.int64, device=dev)
        max_len = max(int(lengths.max()), 1)
        fp_lens = self.fp_lengths(layer)
        fslots = self._slot_table(layer, max(max(fp_lens), 1))  # [H, max_fp]
        ids = torch.tensor([b for row in self.qblocks[layer] for b in row], dtype=torch.int64, device=dev)
        kq, vq = self.quant.decode({name: t[ids] for name, t in qp.data.items()}, pool.dtype)  # [nb, qbs, D]
        kq, vq = kq.reshape(-1, d), vq.reshape(-1, d)
        qslot_all = (ids[:, None] * qbs + torch.arange(qbs, device=dev)).reshape(-1)  # [nb * qbs]
        alive_all = qp.alive[ids].reshape(-1)
        k = pool.k.new_zeros(h, max_len, d)
        v = pool.v.new_zeros(h, max_len, d)
        pos = torch.zeros(h, max_len, dtype=torch.int64, device=dev)
        score = torch.zeros(h, max_len, dtype=torch.float32, device=dev)
        slots = torch.zeros(h, max_len, dtype=torch.int64, device=dev)  # quantized entries/padding: null block
        qslots = torch.full((h, max_len), -1, dtype=torch.int64, device=dev)
        off = 0
        for r in range(h):
            nb, ql, fl = len(self.qblocks[layer][r]), self.qlens[layer][r], fp_lens[r]
            loc = off * qbs + torch.nonzero(alive_all[off * qbs : (off + nb) * qbs]).flatten()  # [ql]
            assert loc.numel() == ql, f"row ({layer}, {r}): {loc.numel()} live quantized tokens, expected {ql}"
            qs = qslot_all[loc]
            k[r, :ql], v[r, :ql], qslots[r, :ql] = kq[loc], vq[loc], qs
            pos[r, :ql], score[r, :ql] = qp.pos.view(-1)[qs], qp.score.view(-1)[qs]
            fs = fslots[r, :fl]
            k[r, ql : ql + fl], v[r, ql : ql + fl] = pool.k.view(-1, d)[fs], pool.v.view(-1, d)[fs]
            pos[r, ql : ql + fl], score[r, ql : ql + fl] = pool.pos.view(-1)[fs], pool.score.view(-1)[fs]
            slots[r, ql : ql + fl] = fs
            off += nb
        valid = torch.arange(max_len, device=dev)[None, :] < lengths[:, None]
        return RowView(k=k, v=v, pos=pos, score=score, valid=valid, lengths=lengths, slots=slots, qslots=qslots)

    def _compact_quantized(self, layer: int, view: RowView, keep: list[Tensor]) -> None:
        assert view.qslots is not None and self.qpool is not None
        bs, d, qbs = self.pool.block_size, self.pool.head_dim, self.quant_block_size
        qp = self.qpool
        for h, idx in enumerate(keep):
            n = int(idx.numel())
            old = self.lengths[layer][h]
            if n == old:
                continue
            idx = idx.to(view.k.device)
            ql = self.qlens[layer][h]
            qkeep, fkeep = idx[idx < ql], idx[idx >= ql]
            if qkeep.numel() < ql:  # drop quantized tokens: mark dead, free emptied blocks
                alive = qp.alive.view(-1)
                alive[view.qslots[h, :ql]] = False
                alive[view.qslots[h, qkeep]] = True
                self.qlens[layer][h] = int(qkeep.numel())
                row = self.qblocks[layer][h]
                live = qp.alive[torch.tensor(row, dtype=torch.int64, device=qp.device)].any(dim=1).tolist()
                qp.free([b for b, lv in zip(row, live, strict=True) if not lv])
                row[:] = [b for b, lv in zip(row, live, strict=True) if lv]
            nf = int(fkeep.numel())
            if nf < old - ql:  # compact the fp part in place
                dst = view.slots[h, ql : ql + nf]
                self.pool.k.view(-1, d)[dst] = view.k[h, fkeep]
                self.pool.v.view(-1, d)[dst] = view.v[h, fkeep]
                self.pool.pos.view(-1)[dst] = view.pos[h, fkeep]
                self.pool.score.view(-1)[dst] = view.score[h, fkeep]
                keep_blocks = (nf + bs - 1) // bs
                surplus = self.blocks[layer][h][keep_blocks:]
                del self.blocks[layer][h][keep_blocks:]
                self.pool.free(surplus)
            self.lengths[layer][h] = n
            row = self.qblocks[layer][h]
            if len(row) * qbs - self.qlens[layer][h] >= qbs:
                counts = qp.alive[torch.tensor(row, dtype=torch.int64, device=qp.device)].sum(dim=1).tolist()
                self._dequantize_from(layer, h, next(j for j, c in enumerate(counts) if c < qbs))

    def _dequantize_from(self, layer: int, h: int, j: int) -> None:
        """Move row (layer, h)'s quantized blocks ``j..`` (live tokens only) back to the front of its fp part."""
        self.mark_changed(layer)
        assert self.quant is not None and self.qpool is not None
        pool, qp, bs, d = self.pool, self.qpool, self.pool.block_size, self.pool.head_dim
        qrow = self.qblocks[layer][h][j:]
        ids = torch.tensor(qrow, dtype=torch.int64, device=qp.device)
        kq, vq = self.quant.decode({name: t[ids] for name, t in qp.data.items()}, pool.dtype)
        alive = qp.alive[ids].reshape(-1)
        kq, vq = kq.reshape(-1, d)[alive], vq.reshape(-1, d)[alive]
        posq, scoreq = qp.pos[ids].reshape(-1)[alive], qp.score[ids].reshape(-1)[alive]
        fl = self.lengths[layer][h] - self.qlens[layer][h]
        fs = self._slot_table(layer, max(fl, 1))[h, :fl]
        k = torch.cat([kq, pool.k.view(-1, d)[fs]])
        v = torch.cat([vq, pool.v.view(-1, d)[fs]])
        pos = torch.cat([posq, pool.pos.view(-1)[fs]])
        score = torch.cat([scoreq, pool.score.view(-1)[fs]])
        n = k.shape[0]
        new = pool.allocate((n + bs - 1) // bs)  # may grow the pool: everything above is a copy
        pool.free(self.blocks[layer][h])
        qp.free(qrow)
        self.blocks[layer][h] = new
        del self.qblocks[layer][h][j:]
        self.qlens[layer][h] -= int(posq.numel())
        idx = torch.arange(n, device=pool.device)
        slots = torch.tensor(new, dtype=torch.int64, device=pool.device)[idx // bs] * bs + idx % bs
        pool.k.view(-1, d)[slots] = k
        pool.v.view(-1, d)[slots] = v
        pool.pos.view(-1)[slots] = pos
        pool.score.view(-1)[slots] = score
        self.mark_changed(layer)  # again: the slot table read above cached the old block list

    def settle(self, layer: int) -> None:
        """Quantize the oldest fp tokens of every row of ``layer``, one quantized block at a time, while at
        least ``residual`` fp tokens remain; their fp blocks return to the pool. No-op without ``quant``."""
        if self.quant is None:
            return
        assert self.qpool is not None
        pool, qp, qbs, d = self.pool, self.qpool, self.quant_block_size, self.pool.head_dim
        per = qbs // pool.block_size  # fp blocks per quantized block
        chunks = [max(0, (fl - self.quant.residual) // qbs) for fl in self.fp_lengths(layer)]
        total = sum(chunks)
        if total == 0:
            return
        self.mark_changed(layer)
        src = [b for h, c in enumerate(chunks) for b in self.blocks[layer][h][: c * per]]
        ids = torch.tensor(src, dtype=torch.int64, device=pool.device)
        k = pool.k[ids].reshape(total, qbs, d)
        v = pool.v[ids].reshape(total, qbs, d)
        pos = pool.pos[ids].reshape(total, qbs)
        score = pool.score[ids].reshape(total, qbs)
        data = self.quant.encode(k, v)
        new = qp.allocate(total)  # may grow the quantized pool: index it only below
        nid = torch.tensor(new, dtype=torch.int64, device=qp.device)
        for name, t in data.items():
            qp.data[name][nid] = t
        qp.pos[nid], qp.score[nid], qp.alive[nid] = pos, score, True
        for h, c in enumerate(chunks):
            if c:
                self.qblocks[layer][h].extend(new[:c])
                del new[:c]
                pool.free(self.blocks[layer][h][: c * per])
                del self.blocks[layer][h][: c * per]
                self.qlens[layer][h] += c * qbs
        self._cache.clear()
