"""The select axis inside the batched decode step: sequences grouped by select method, each group selecting and
attending as one batch, bytes read counted on the device.

Built once per step by :class:`~longctx.engine.fast_decode.FastDecodeContext` when some sequence's select
method narrows reads (all ``select=all``: nothing here runs). Per layer, after the fused K/V write:

- block summaries of the blocks just written are recomputed (when a method ranks blocks), so they stay exact
  as rows grow (:mod:`longctx.kv.select.summaries`); rows changed by any other path are refreshed in
  :func:`prepare_select` before the step;
- each group (sequences sharing one select method; ``all`` is a group too) runs its method's
  :meth:`~longctx.kv.select.base.SelectPolicy.select` over its rows in the pool and attends through
  :func:`~longctx.kv.select.attend.attend_selection`; outputs are scattered back in batch order;
- the bytes each row read (selected K/V plus the method's own reads) accumulate in a [b, H] device counter per
  group (Quest adds to it inside its selection kernel; other methods after their selection), summed into
  each sequence's counter after the step (a few kernels per step, one multi-tensor add, no synchronisation).

Stateless methods keep every tensor shape fixed per (batch, table capacity, grouping), so such steps are
captured in CUDA graphs (``engine.cuda_graph`` keys on :func:`select_key`); stateful ones run eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.device import tensor_on
from longctx.kv.select.attend import attend_selection
from longctx.kv.select.base import PagedRows, SelectState, row_bytes_read
from longctx.kv.select.summaries import ensure_summaries, refresh_rows, update_written
from longctx.kv.sequence import SequenceKV


def narrows_reads(seqs: list[SequenceKV]) -> bool:
    """Whether any sequence's select method reads less than every kept token."""
    return any(not s.select.reads_all for s in seqs)


def select_key(seqs: list[SequenceKV]) -> tuple | None:
    """What a captured decode step's selection depends on: each row's select method (None: all read all)."""
    return tuple(s.select for s in seqs) if narrows_reads(seqs) else None


def can_capture(seqs: list[SequenceKV]) -> bool:
    """Stateful select methods keep per-sequence tensors between steps: such steps run eagerly."""
    return not any(s.select.stateful for s in seqs)


def prepare_select(seqs: list[SequenceKV], tables: list[Tensor], lens: list[Tensor]) -> None:
    """Host side, before a batched decode step: block summaries for the methods that rank blocks (refreshed
    for every sequence whose rows changed other than by the batched step's own writes)."""
    for seq, table, n in zip(seqs, tables, lens, strict=True):
        if not seq.select.needs_block_summaries:
            continue
        pool = seq.rows.pool
        ensure_summaries(pool)
        dt = seq.device_tables
        if getattr(dt, "rows_reloaded", True):
            refresh_rows(pool, table, n)
            dt.rows_reloaded = False  # type: ignore[union-attr]


class SelectStep:
    """The select side of one batched decode step over ``seqs`` (see module docstring)."""

    def __init__(self, seqs: list[SequenceKV], device: torch.device, cfg) -> None:  # noqa: ANN001
        self.head_dim = cfg.head_dim
        self.summarize = any(s.select.needs_block_summaries for s in seqs)
        groups: dict[object, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(s.select, []).append(i)
        whole = len(groups) == 1
        self.groups = []
        for policy, idx in groups.items():
            index = None if whole else tensor_on(idx, torch.int64, device, idle=True)
            state = SelectState([seqs[i].select_state_now() for i in idx], {}, [seqs[i].select_steps for i in idx],
                                cfg.num_layers, cfg.scale, cfg.attn_logit_softcapping,
                                read_acc=torch.zeros(len(idx), cfg.num_kv_heads, dtype=torch.int64, device=device))
            self.groups.append((policy, index, state))
        self.read_bytes = torch.zeros(len(seqs), dtype=torch.int64, device=device)

    def begin(self) -> None:
        """Before the step's first layer: the step's counters start at zero (inside a captured graph, too)."""
        self.read_bytes.zero_()
        for _, _, state in self.groups:
            state.step.clear()
            assert state.read_acc is not None
            state.read_acc.zero_()

    def attend(self, layer: int, q: Tensor, pool, tables: Tensor, lens: Tensor, slots: Tensor, scale: float,  # noqa: ANN001
               softcap: float | None, attention_fn) -> Tensor:  # noqa: ANN001
        """Decode attention of layer ``layer`` for rotated q [B, Hq, D] over rows (tables [B, H, cap], lens
        [B, H] tokens incl. the new one) whose new tokens were just written to the flat pool ``slots``."""
        if self.summarize:
            update_written(pool, slots)
        out = None if len(self.groups) == 1 else torch.empty_like(q)
        for policy, index, state in self.groups:
            sub = (lambda t: t) if index is None else (lambda t, i=index: t.index_select(0, i))
            rows = PagedRows(pool.k, pool.v, pool.pos, sub(tables), sub(lens), pool.summary)
            qs = sub(q)
            sel = None if policy.reads_all else policy.select(layer, qs, rows, state)
            o = attend_selection(qs, rows, sel, scale, softcap, attention_fn)
            acc = state.read_acc
            assert acc is not None
            if policy.reads_all:
                acc.add_(rows.lengths, alpha=rows.token_bytes)
            elif sel is None or not sel.counted:
                acc += row_bytes_read(policy, layer, rows, sel, state, pool.k.element_size(), self.head_dim)
            if index is None:
                out = o
            else:
                out.index_copy_(0, index, o)  # type: ignore[union-attr]
        return out  # type: ignore[return-value]

    def count_full_layer(self, lens: Tensor, element_size: int) -> None:
        """A layer every row read whole (a sliding window's trimmed rows): count its rows' tokens."""
        self.read_bytes += lens.long().sum(-1) * (2 * self.head_dim * element_size)

    def finish(self, seqs: list[SequenceKV]) -> None:
        """After the step over ``seqs`` (the sequences of this replay): bytes read and the select clock."""
        for _, index, state in self.groups:  # each group's [b, H] counter into the step's [B]
            assert state.read_acc is not None
            if index is None:
                self.read_bytes += state.read_acc.sum(-1)
            else:
                self.read_bytes.index_add_(0, index, state.read_acc.sum(-1))
        for seq in seqs:  # every row gets a counter (select=all rows' stay unread); one multi-tensor add, no sync
            if seq.read_acc is None:
                seq.read_acc = torch.zeros((), dtype=torch.int64, device=self.read_bytes.device)
            if not seq.select.reads_all:
                seq.stats.decode_steps += 1
            seq.select_steps += 1
        torch._foreach_add_([seq.read_acc for seq in seqs], list(self.read_bytes.unbind(0)))
