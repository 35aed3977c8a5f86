"""Rows: one (sequence, layer, kv-head) of KV storage with its own length and blocks.

A :class:`RowSet` holds the rows of one sequence: ``num_layers × num_kv_heads``
rows, each a list of block ids in the shared :class:`~longctx.kv.pool.BlockPool`
and a length. Tokens inside a row are kept in order of their original
position; the pool records that position for every token. Because each row has
its own length, head-wise and layer-wise budgets free real blocks.

Layout of one row (block_size = 4, length 10)::

    blocks:  [b7]        [b2]        [b9]
    tokens:  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 .  .
                                          ^ next slot = blocks[10 // 4] * 4 + 10 % 4

Quantized rows (``quant=int8`` / ``int4``, a :class:`QuantCodec` given to the
RowSet): a row is a prefix of quantized blocks in a
:class:`~longctx.kv.pool.QuantBlockPool` followed by a suffix of fp blocks,
which always starts at a block boundary. :meth:`RowSet.settle` (called by the
engine at the end of each layer step, after attention and eviction) moves the
oldest whole quantized-block's worth of fp tokens of a row into one quantized
block while more than ``residual`` fp tokens would remain, and frees their fp
blocks. :meth:`RowSet.gather` dequantizes the prefix and concatenates, so
attention, scoring and eviction see ordinary dense rows (quantized entries
carry their pool slot in ``RowView.qslots``)::

    quant blocks (8 tokens): [q3: t0..t7] [q5: t8 t9 x t11 .. t15]   fp blocks: [b2: t16..t19] [b9: t20 t21 . .]

Eviction inside the quantized prefix only marks tokens dead (``x`` above): the
block's shared key scales stay valid for the others, so this is lossless. Once
a row's dead slots add up to a whole quantized block, the row's blocks from
the first one with a dead slot onward are dequantized back into fp blocks and
re-quantized, densely, by the next ``settle`` (values, quantized per token,
come back with the same codes; keys are re-grouped, which adds quantization
error to those tokens). Those quantized-prefix operations live in :mod:`longctx.kv.rows_quant`
(``RowSet``'s base class); :class:`RowView` and :class:`QuantCodec` in :mod:`longctx.kv.row_view`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from longctx.device import tensor_on, to_device
from longctx.errors import OutOfBlocksError
from longctx.kv.pool import NULL_BLOCK, BlockPool, QuantBlockPool
from longctx.kv.row_view import QuantCodec, RowView
from longctx.kv.rows_quant import QuantizedPrefix

__all__ = ["QuantCodec", "RowSet", "RowView", "compact_rows", "gather_rows", "table_width"]


def table_width(blocks: int) -> int:
    """Width of a host block table for rows of up to ``blocks`` blocks: a power of two, at least 16."""
    return max(16, 1 << (max(blocks, 1) - 1).bit_length())


class RowSet(QuantizedPrefix):
    """The rows of one sequence: ``num_layers × num_kv_heads`` independently sized rows.

    With ``quant`` the rows keep a quantized prefix (``qblocks``, ``qlens`` live tokens) before their
    fp blocks (``blocks``); ``lengths`` is always the whole row.
    """

    def __init__(self, pool: BlockPool, num_layers: int, num_kv_heads: int, quant: QuantCodec | None = None) -> None:
        self.pool = pool
        # bytes a block costs beyond its K and V (a select method's block summaries), counted in bytes held
        self.extra_bytes_per_block = 0
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.blocks: list[list[list[int]]] = [[[] for _ in range(num_kv_heads)] for _ in range(num_layers)]
        self._lengths: list[list[int]] = [[0] * num_kv_heads for _ in range(num_layers)]
        # Host work per decode step must not grow with layers x heads: ``advance`` (one token in every row) is
        # recorded as a count and applied to the nested lists only when someone reads them; the figures a
        # step needs (room left in the blocks, blocks and tokens held, longest row per layer) are cached and
        # kept current by ``advance``, recomputed after any other change (``mark_changed``, ``append``).
        self._advanced = 0
        self._cache: dict[str, object] = {}
        self.quant = quant
        self.qpool: QuantBlockPool | None = None
        self.quant_block_size = 0
        self.qblocks: list[list[list[int]]] = [[[] for _ in range(num_kv_heads)] for _ in range(num_layers)]
        self.qlens: list[list[int]] = [[0] * num_kv_heads for _ in range(num_layers)]
        # Bumped whenever block lists change other than by ``reserve``; device-side block
        # tables (engine.fast_decode) are rebuilt when it moves.
        self.version = 0
        # Bumped whenever a row's token indices may change (compaction, copy, release): select methods that
        # remember row indices across steps drop them when it moves (growth and quantization keep indices).
        self.reindexed = 0
        # Blocks ``reserve`` appended since the device tables last looked: (layer, head, index in row, block id)
        self.added: list[tuple[int, int, int, int]] = []
        self.track_added = False  # set once device tables exist (until then nobody reads ``added``)
        # Per layer: bumped whenever that layer's block lists change at all; keys the host table cache.
        self.layer_version = [0] * num_layers
        self._np_tables: list[tuple[int, np.ndarray] | None] = [None] * num_layers
        if quant is not None:
            qbs = quant.tokens_per_block(pool.block_size)
            if qbs <= 0 or qbs % pool.block_size:
                raise ValueError(f"a quantized block ({qbs} tokens) must hold whole blocks of {pool.block_size}")
            self.quant_block_size = qbs
            self.qpool = pool.quant_pool(quant.fields(pool.head_dim, qbs), qbs)

    @property
    def lengths(self) -> list[list[int]]:
        """[layer][kv_head] tokens in each row (whole rows: quantized prefix + fp part)."""
        if self._advanced:
            n, self._advanced = self._advanced, 0
            self._lengths = [[x + n for x in layer] for layer in self._lengths]
        return self._lengths

    @lengths.setter
    def lengths(self, value: list[list[int]]) -> None:
        self._lengths, self._advanced = value, 0
        self._cache.clear()

    def advance(self, num_new: int = 1) -> None:
        """Count ``num_new`` more tokens in every row (written by a batched decode step into reserved room):
        constant host work, whatever the number of rows."""
        self._advanced += num_new
        cache = self._cache
        if "room" in cache:
            cache["room"] -= num_new  # type: ignore[operator]
        if "tokens" in cache:
            cache["tokens"] += num_new * self.num_layers * self.num_kv_heads  # type: ignore[operator]
        if "layer_max" in cache:
            cache["layer_max"] = [m + num_new for m in cache["layer_max"]]  # type: ignore[attr-defined]
        if "max" in cache:
            cache["max"] += num_new  # type: ignore[operator]

    def _cached(self, key: str, compute):  # noqa: ANN001, ANN202
        cache = self._cache
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def max_length(self, layer: int) -> int:
        """Tokens in the longest row of ``layer``."""
        return self._cached("layer_max", lambda: [max(ln) for ln in self.lengths])[layer]

    def max_length_overall(self) -> int:
        """Tokens in the longest row of any layer."""
        return self._cached("max", lambda: max(max(ln) for ln in self.lengths))  # type: ignore[return-value]

    def mark_changed(self, layer: int | None = None, structural: bool = True, patched: bool = False) -> None:
        """Record that block lists changed (``layer`` or every layer); ``structural`` moves ``version`` too.
        ``patched``: the change (growth by :meth:`_grow_layer`, a cut by :meth:`_cut_rows`) was already applied to a
        current host table, which stays current."""
        self._cache.clear()
        if structural:
            self.version += 1
            self.added.clear()  # device tables rebuild from the block lists; queued patches would be stale
        for lay in range(self.num_layers) if layer is None else (layer,):
            table = self._current_table(lay) if patched else None
            self.layer_version[lay] += 1
            if table is not None:
                self._np_tables[lay] = (self.layer_version[lay], table)

    def _current_table(self, layer: int) -> np.ndarray | None:
        """The cached host table of ``layer`` if it matches the block lists, else None."""
        cached = self._np_tables[layer]
        return cached[1] if cached is not None and cached[0] == self.layer_version[layer] else None

    def block_table_np(self, layer: int) -> np.ndarray:
        """[num_kv_heads, W] int64 block ids of ``layer``'s rows, NULL_BLOCK-padded, W at least the most blocks a
        row holds (growth widens it to :func:`table_width`; after an eviction's cut it keeps its width); built
        from the block lists when they change other than by growth or a cut, which patch it
        (:meth:`_grow_layer`, :meth:`_cut_rows`)."""
        cached = self._current_table(layer)
        if cached is not None:
            return cached
        width = max(max(len(b) for b in self.blocks[layer]), 1)
        table = np.full((self.num_kv_heads, width), NULL_BLOCK, dtype=np.int64)
        for h, blocks in enumerate(self.blocks[layer]):
            table[h, : len(blocks)] = blocks
        self._np_tables[layer] = (self.layer_version[layer], table)
        return table

    def _grow_row(self, layer: int, head: int, new: list[int]) -> None:
        """Append blocks ``new`` to row (layer, head); see :meth:`_grow_layer`."""
        self._grow_layer(layer, [(head, len(new))], new)

    def _grow_layer(self, layer: int, grow: list[tuple[int, int]], new: list[int]) -> None:
        """Append ``new`` to rows of ``layer``: (head, m) in ``grow`` takes the next m ids, in order. Queues the
        assignments in :attr:`added` when tracked, and patches the layer's cached host table in place, once for
        the layer (growth is the common change: a prefill chunk, a decode step's new block; rebuilding the table
        from the block lists cost ~0.2 ms per row at 128K). The table widens to a power of two (as the device
        tables do), so most growth writes into its padding. The caller then marks the layer changed with
        ``patched=True``."""
        rows = self.blocks[layer]
        starts = [len(rows[h]) for h, _ in grow]
        i = 0
        for (h, m), start in zip(grow, starts, strict=True):
            ids = new[i : i + m]
            i += m
            rows[h].extend(ids)
            if self.track_added:
                self.added.extend((layer, h, start + j, b) for j, b in enumerate(ids))
        table = self._current_table(layer)
        if table is None:
            return
        width = max(start + m for (_, m), start in zip(grow, starts, strict=True))
        if width > table.shape[1]:
            wide = np.full((table.shape[0], table_width(width)), NULL_BLOCK, dtype=table.dtype)
            wide[:, : table.shape[1]] = table
            table = wide
            self._np_tables[layer] = (self.layer_version[layer], table)
        if all(m == 1 for _, m in grow):  # a decode step's block: one fancy assignment for the layer
            table[[h for h, _ in grow], starts] = new
            return
        i = 0
        for (h, m), start in zip(grow, starts, strict=True):
            table[h, start : start + m] = new[i : i + m]
            i += m

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """fp blocks held (quantized blocks: :attr:`num_quant_blocks`)."""
        return self._cached("blocks", lambda: sum(len(b) for layer in self.blocks for b in layer))

    @property
    def num_quant_blocks(self) -> int:
        return self._cached("qblocks", lambda: sum(len(b) for layer in self.qblocks for b in layer))

    def _quant_bytes_per_block(self) -> int:
        return self.qpool.bytes_per_block if self.qpool is not None else 0

    def bytes_held(self) -> int:
        """Bytes of K+V in the blocks these rows hold (whole blocks, as allocated; quantized blocks
        at their real size: codes + scales + zeros; plus ``extra_bytes_per_block`` per fp block)."""
        return self.num_blocks * (self.pool.bytes_per_block + self.extra_bytes_per_block) + self.quant_bytes_held()

    def quant_bytes_held(self) -> int:
        """Bytes of the quantized blocks these rows hold (0 without quantization)."""
        return self.num_quant_blocks * self._quant_bytes_per_block()

    def bytes_held_per_row(self) -> list[list[int]]:
        """[layer][kv_head] bytes held by each row."""
        qb = self._quant_bytes_per_block()
        fp = self.pool.bytes_per_block + self.extra_bytes_per_block
        return [[len(b) * fp + len(q) * qb for b, q in zip(layer, qlayer, strict=True)]
                for layer, qlayer in zip(self.blocks, self.qblocks, strict=True)]

    def num_tokens(self) -> int:
        return self._cached("tokens", lambda: sum(sum(layer) for layer in self.lengths))

    def num_quant_tokens(self) -> int:
        """Tokens stored quantized (live tokens of the quantized blocks)."""
        return sum(sum(layer) for layer in self.qlens)

    def fp_lengths(self, layer: int) -> list[int]:
        """Tokens in the fp part of each row of ``layer`` (the whole row without quantization)."""
        if self.quant is None:
            return self.lengths[layer]
        return [n - q for n, q in zip(self.lengths[layer], self.qlens[layer], strict=True)]

    # ---- writing ----------------------------------------------------------------------------
    def _slot_table(self, layer: int, max_len: int) -> Tensor:
        """Flat pool slot of every index < max_len of every row of ``layer``: [num_kv_heads, max_len].

        Only the block lists cross to the device (asynchronously); the slots are computed there."""
        bs = self.pool.block_size
        nb = max((max_len + bs - 1) // bs, 1)
        held = self.block_table_np(layer)
        if held.shape[1] >= nb:
            table = held[:, :nb]
        else:
            table = np.full((self.num_kv_heads, nb), NULL_BLOCK, dtype=np.int64)
            table[:, : held.shape[1]] = held
        dev_table = to_device(torch.from_numpy(table), self.pool.device)
        idx = torch.arange(max_len, device=self.pool.device)
        return dev_table[:, idx // bs] * bs + idx % bs

    def _ensure_capacity(self, layer: int, head: int, length: int) -> None:
        bs = self.pool.block_size
        need = (length + bs - 1) // bs - len(self.blocks[layer][head])
        if need > 0:
            self._grow_row(layer, head, self.pool.allocate(need))
            self.mark_changed(layer, patched=True)

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Append tokens to every row of ``layer``: k/v [num_tokens, num_kv_heads, head_dim], pos [num_tokens]."""
        n = k.shape[0]
        if n == 0:
            return
        starts = self.fp_lengths(layer)
        for h in range(self.num_kv_heads):
            self._ensure_capacity(layer, h, starts[h] + n)
        max_len = max(starts) + n
        slots_all = self._slot_table(layer, max_len)
        offs = tensor_on(starts, torch.int64, slots_all.device)[:, None] + torch.arange(n, device=slots_all.device)
        slots = slots_all.gather(1, offs).reshape(-1)  # [num_kv_heads * n]
        d = self.pool.head_dim
        self.pool.k.view(-1, d)[slots] = k.transpose(0, 1).reshape(-1, d).to(self.pool.dtype)
        self.pool.v.view(-1, d)[slots] = v.transpose(0, 1).reshape(-1, d).to(self.pool.dtype)
        self.pool.pos.view(-1)[slots] = pos.to(self.pool.device).repeat(self.num_kv_heads)
        self.pool.score.view(-1).index_fill_(0, slots, 0.0)  # a Python scalar: no host-to-device copy (sync)
        self.lengths[layer] = [length + n for length in self.lengths[layer]]
        self._cache.clear()

    def has_room_for(self, num_new: int) -> bool:
        """Whether every row's fp blocks have room for ``num_new`` more tokens."""
        bs = self.pool.block_size
        room = self._cached("room", lambda: min(
            len(b) * bs - (n - q)
            for ls, qs, bl in zip(self.lengths, self.qlens, self.blocks, strict=True)
            for n, q, b in zip(ls, qs, bl, strict=True)))
        return room >= num_new  # type: ignore[operator]

    def blocks_needed(self, num_new: int) -> int:
        """fp blocks :meth:`reserve` would take for ``num_new`` more tokens in every row."""
        if self.has_room_for(num_new):
            return 0
        bs = self.pool.block_size
        return sum(max(0, (n - q + num_new + bs - 1) // bs - len(b))
                   for ls, qs, bl in zip(self.lengths, self.qlens, self.blocks, strict=True)
                   for n, q, b in zip(ls, qs, bl, strict=True))

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more tokens in every row (the KV cache manager calls this before a step,
        so the forward finds its blocks in place). Does not move ``version``: the new (layer, head, block
        index in row, block id) assignments are queued in :attr:`added` for whoever keeps a device copy of
        the block tables to patch. Raises OutOfBlocksError, taking nothing, when the pool cannot supply them."""
        if self.has_room_for(num_new):  # the common decode step
            return
        bs = self.pool.block_size
        more = [[(n - q + num_new + bs - 1) // bs - len(b) for n, q, b in zip(ls, qs, bl, strict=True)]
                for ls, qs, bl in zip(self.lengths, self.qlens, self.blocks, strict=True)]
        need = sum(m for layer in more for m in layer if m > 0)
        if not self.pool.can_allocate(need):
            raise OutOfBlocksError(f"KV pool exhausted: {need} blocks needed, {self.pool.num_free_blocks} free")
        fresh = self.pool.allocate(need)  # one allocation for every row
        taken = 0
        for layer, row_more in enumerate(more):
            grow = [(h, m) for h, m in enumerate(row_more) if m > 0]
            if not grow:
                continue
            count = sum(m for _, m in grow)
            self._grow_layer(layer, grow, fresh[taken : taken + count])
            taken += count
            self.mark_changed(layer, structural=False, patched=True)

    def extend_for_decode(self, num_new: int = 1) -> list[tuple[int, int, int, int]]:
        """:meth:`reserve`, then hand over (and clear) every queued assignment of :attr:`added`."""
        self.track_added = True
        self.reserve(num_new)
        added, self.added = self.added, []
        return added

    # ---- reading ----------------------------------------------------------------------------
    def gather(self, layer: int) -> RowView:
        """Copy ``layer``'s rows out of the pool into padded dense tensors (quantized entries dequantized)."""
        if any(self.qlens[layer]):
            return self._gather_quantized(layer)
        lengths = tensor_on(self.lengths[layer], torch.int64, self.pool.device)
        max_len = max(max(self.lengths[layer]), 1)
        slots = self._slot_table(layer, max_len)
        d = self.pool.head_dim
        flat = slots.reshape(-1)
        h = self.num_kv_heads
        valid = torch.arange(max_len, device=self.pool.device)[None, :] < lengths[:, None]
        return RowView(
            k=self.pool.k.view(-1, d)[flat].view(h, max_len, d),
            v=self.pool.v.view(-1, d)[flat].view(h, max_len, d),
            pos=self.pool.pos.view(-1)[flat].view(h, max_len),
            score=self.pool.score.view(-1)[flat].view(h, max_len),
            valid=valid,
            lengths=lengths,
            slots=slots,
        )

    def gather_layers(self, layers: list[int]) -> RowView:
        """:meth:`gather` of several layers at once, their rows stacked layer-major ([len(layers) * H, ...]);
        one upload of block tables and lengths for all of them. fp rows only."""
        return gather_rows([(self, layer) for layer in layers])

    def write_scores(self, view: RowView, scores: Tensor) -> None:
        """Store a per-token statistic [num_kv_heads, max_len] for the valid entries of ``view``."""
        if view.qslots is None:
            self.pool.score.view(-1)[view.slots[view.valid]] = scores[view.valid].float()
            return
        assert self.qpool is not None
        quantized = view.qslots >= 0
        fp = view.valid & ~quantized
        self.pool.score.view(-1)[view.slots[fp]] = scores[fp].float()
        self.qpool.score.view(-1)[view.qslots[quantized]] = scores[quantized].float()

    # ---- eviction ---------------------------------------------------------------------------
    def compact(self, layer: int, view: RowView, keep: list[Tensor]) -> None:
        """Keep only ``keep[h]`` (sorted indices into row h of ``view``) and free surplus blocks.

        ``view`` must be a fresh gather of ``layer`` (its tensors are copies, so the
        in-place rewrite below cannot read what it has just overwritten). In a quantized prefix,
        dropped tokens are marked dead (lossless) and emptied blocks freed; a row whose dead slots
        add up to a whole quantized block is dequantized from its first block with a dead slot
        onward, to be re-quantized densely by the next :meth:`settle` (see the module doc).
        """
        self.reindexed += 1
        if view.qslots is not None:
            self.mark_changed(layer)
            self._compact_quantized(layer, view, keep)
            return
        d = self.pool.head_dim
        counts = list(self.lengths[layer])
        for h, idx in enumerate(keep):
            n = int(idx.numel())
            if n == counts[h]:
                continue
            idx = idx.to(view.k.device)
            dst = view.slots[h, :n]
            self.pool.k.view(-1, d)[dst] = view.k[h, idx]
            self.pool.v.view(-1, d)[dst] = view.v[h, idx]
            self.pool.pos.view(-1)[dst] = view.pos[h, idx]
            self.pool.score.view(-1)[dst] = view.score[h, idx]
            counts[h] = n
        self._cut_rows(layer, counts)

    def compact_padded(self, layers: int | list[int], view: RowView, keep: Tensor, counts: list[int]) -> None:
        """:meth:`compact` with every row's indices in one padded tensor: row r keeps ``keep[r, :counts[r]]``
        (sorted, entries past the count ignored). ``view`` holds the rows of ``layers`` (one layer, or several
        stacked layer-major as :meth:`gather_layers` gives them). One batched rewrite, no host
        synchronisation (the counts are host ints). fp rows only (no quantized prefix)."""
        layers = [layers] if isinstance(layers, int) else layers
        compact_rows([(self, layer) for layer in layers], view, keep, counts)

    def _cut_rows(self, layer: int, counts: list[int]) -> None:
        """Host side of an fp compaction: ``layer``'s rows now hold ``counts`` tokens (kept tokens fill each
        row's first blocks); surplus blocks go back. A cut keeps every row's remaining block ids in place, so it
        is not a structural change: device tables keep their entries and only re-read the lengths, and the
        cached host table is cut in place."""
        bs, blocks, lengths = self.pool.block_size, self.blocks[layer], self.lengths[layer]
        table = self._current_table(layer)  # cut in place, as wide as before (the next growth needs no re-pad)
        for h, n in enumerate(counts):
            lengths[h] = n
            keep_blocks = (n + bs - 1) // bs
            if len(blocks[h]) > keep_blocks:
                self.pool.free(blocks[h][keep_blocks:])
                del blocks[h][keep_blocks:]
                if table is not None:
                    table[h, keep_blocks:] = NULL_BLOCK
        self.mark_changed(layer, structural=False, patched=True)

    def copy_from(self, other: RowSet) -> None:
        """Make these (empty) rows a copy of ``other``'s: new blocks, same contents (a forked prefix)."""
        self.mark_changed()
        self.reindexed += 1
        if self.quant is not None or other.quant is not None:
            raise ValueError("copying quantized rows is not supported")
        if self.num_blocks:
            raise ValueError("copy_from needs empty rows")
        src = [b for layer in other.blocks for row in layer for b in row]
        dst = self.pool.allocate(len(src))
        if src:
            s_idx = torch.tensor(src, device=self.pool.device)
            d_idx = torch.tensor(dst, device=self.pool.device)
            for t in (self.pool.k, self.pool.v, self.pool.pos, self.pool.score):
                t[d_idx] = t[s_idx]
        it = iter(dst)
        self.blocks = [[[next(it) for _ in row] for row in layer] for layer in other.blocks]
        self.lengths = [list(x) for x in other.lengths]

    def release(self) -> None:
        """Return every block to the pool (request finished or preempted)."""
        self.mark_changed()
        self.reindexed += 1
        for layer in self.blocks:
            for blocks in layer:
                self.pool.free(blocks)
                blocks.clear()
        self.lengths = [[0] * self.num_kv_heads for _ in range(self.num_layers)]
        if self.qpool is not None:
            for layer in self.qblocks:
                for blocks in layer:
                    self.qpool.free(blocks)
                    blocks.clear()
        self.qlens = [[0] * self.num_kv_heads for _ in range(self.num_layers)]
        self._cache.clear()


# ---- rows of several layers or sequences at once (they share one pool) --------------------------------------
def upload_tables(pairs: list[tuple[RowSet, int]], dtype: type = np.int64) -> tuple[Tensor, Tensor]:
    """Block tables [R, nb] (NULL_BLOCK-padded, nb = the blocks of the longest row) and lengths [R] of the fp
    rows of every (row set, layer) in ``pairs``, stacked in that order, in one upload. The row sets may belong
    to different sequences: they index one pool."""
    pool = pairs[0][0].pool
    assert all(rs.pool is pool for rs, _ in pairs), "stacked rows need row sets of one pool"
    bs = pool.block_size
    lens = [n for rs, layer in pairs for n in rs.lengths[layer]]
    nb = (max(max(lens), 1) + bs - 1) // bs
    table = np.full((len(lens), nb), NULL_BLOCK, dtype=dtype)
    r = 0
    for rs, layer in pairs:
        held = rs.block_table_np(layer)[:, :nb]
        table[r : r + rs.num_kv_heads, : held.shape[1]] = held
        r += rs.num_kv_heads
    both = to_device(torch.from_numpy(np.concatenate([table.reshape(-1), np.asarray(lens, dtype=dtype)])),
                     pool.device)
    return both[: table.size].view(len(lens), nb), both[table.size :]


def gather_rows(pairs: list[tuple[RowSet, int]]) -> RowView:
    """The fp rows of every (row set, layer) in ``pairs``, stacked in that order ([len(pairs) * H, ...]) as
    :meth:`RowSet.gather` gives one layer's; one upload of block tables and lengths for all of them. The row
    sets may belong to different sequences: they index one pool."""
    assert not any(any(rs.qlens[layer]) for rs, layer in pairs), "gather_rows handles fp rows only"
    pool = pairs[0][0].pool
    bs, d, dev = pool.block_size, pool.head_dim, pool.device
    tables, lengths = upload_tables(pairs)
    rows = tables.shape[0]
    max_len = max(max(rs.max_length(layer) for rs, layer in pairs), 1)
    idx = torch.arange(max_len, device=dev)
    slots = tables[:, idx // bs] * bs + idx % bs  # [R, max_len]
    flat = slots.reshape(-1)
    return RowView(
        k=pool.k.view(-1, d)[flat].view(rows, max_len, d),
        v=pool.v.view(-1, d)[flat].view(rows, max_len, d),
        pos=pool.pos.view(-1)[flat].view(rows, max_len),
        score=pool.score.view(-1)[flat].view(rows, max_len),
        valid=idx[None, :] < lengths[:, None],
        lengths=lengths,
        slots=slots,
    )


def compact_rows(pairs: list[tuple[RowSet, int]], view: RowView, keep: Tensor, counts: list[int]) -> None:
    """:meth:`RowSet.compact_padded` of the rows :func:`gather_rows` gathered for ``pairs``: row r keeps
    ``keep[r, :counts[r]]``; one batched rewrite of the pool for all of them, then each row set's lengths and
    blocks. fp rows only."""
    assert view.qslots is None, "compact_rows handles fp rows only"
    pool = pairs[0][0].pool
    for rs, _ in pairs:
        rs.reindexed += 1
    k = keep.shape[1]
    d, dev = pool.head_dim, keep.device
    current = [n for rs, layer in pairs for n in rs.lengths[layer]]
    if k and counts != current:
        last = tensor_on([max(c - 1, 0) for c in counts], torch.int64, dev)[:, None]
        # entries past a row's count repeat its last kept entry (the same value to the same slot)
        j = torch.minimum(torch.arange(k, device=dev)[None, :], last)  # [R, k]
        src = keep.gather(1, j).clamp_max(view.k.shape[1] - 1)
        dst = view.slots.gather(1, j.clamp_max(view.slots.shape[1] - 1)).reshape(-1)
        pool.k.view(-1, d)[dst] = view.k.gather(1, src[..., None].expand(-1, -1, d)).reshape(-1, d)
        pool.v.view(-1, d)[dst] = view.v.gather(1, src[..., None].expand(-1, -1, d)).reshape(-1, d)
        pool.pos.view(-1)[dst] = view.pos.gather(1, src).reshape(-1)
        pool.score.view(-1)[dst] = view.score.gather(1, src).reshape(-1)
    r = 0
    for rs, layer in pairs:
        rs._cut_rows(layer, counts[r : r + rs.num_kv_heads])
        r += rs.num_kv_heads
