"""Eviction of many sequences at once: every sequence of a batched decode step, or the prompt chunks of one
layer step over several sequences (:func:`evict_due`).

After a batched decode step each sequence whose rows went over budget (+ slack) runs its retain policy. Done
one sequence at a time, that is a few dozen small device operations, a few uploads and some Python per
sequence, which at batch 64 costs more than the step itself. Here the sequences that share a retain policy
(the same frozen parameters), native RoPE positions and one RoPE are scored as one stack of rows: one
gather of their rows out of the shared pool, one window-attention pass with per-row query positions, one
selection and one rewrite, then each sequence's host bookkeeping. The choice of tokens equals evicting each
sequence on its own (``tests/kv/test_decode_eviction.py``); sequences that do not fit a group (quantized rows,
sliding windows, other positions policies, per-layer merging) are evicted one by one as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from longctx.attention.reference import attention_probs
from longctx.kv.eviction import select_keep_padded
from longctx.kv.positions.base import PositionPolicy
from longctx.kv.retain.base import KVView
from longctx.kv.rows import RowView, compact_rows, gather_rows
from longctx.model.rope import Rotary

if TYPE_CHECKING:
    from longctx.kv.sequence import SequenceKV

# (sequence, its layers due for eviction, the step's position)
Due = tuple["SequenceKV", list[int], int]


def evict_after_decode_batch(seqs: Sequence[SequenceKV], rotaries: list[Rotary], newest: Sequence[int] | None) -> None:
    """:meth:`SequenceKV.evict_after_decode` for every sequence of a batched decode step, grouping those that
    can be scored together (``newest``: each sequence's position on the host, or None when unknown)."""
    groups: dict[tuple, list[Due]] = {}
    for i, seq in enumerate(seqs):
        pos = None if newest is None else int(newest[i])
        layers = seq.decode_eviction_layers(rotaries, pos)
        if not layers:
            continue
        if pos is None or not seq._can_evict_stacked(layers, rotaries):
            seq.evict_layers(layers, rotaries, pos)
            continue
        groups.setdefault(_group_key(seq, rotaries[layers[0]], pos, layers), []).append((seq, layers, pos))
    for group in groups.values():
        evict_stacked(group, rotaries[group[0][1][0]])


def evict_due(due: list[Due], rotary: Rotary) -> None:
    """The evictions a layer step over several sequences deferred (``SequenceKV.attend_layer(deferred=...)``):
    one layer each, grouped like a decode step's and evicted one stack per group (``rotary``: the layer's)."""
    groups: dict[tuple, list[Due]] = {}
    for seq, layers, pos in due:
        groups.setdefault(_group_key(seq, rotary, pos, layers), []).append((seq, layers, pos))
    for group in groups.values():
        evict_stacked(group, rotary)


def _group_key(seq: SequenceKV, rotary: Rotary, newest: int, layers: list[int]) -> tuple:
    """Sequences with equal keys are scored as one stack. Plain-RoPE logits only (a positions policy with its
    own logits or mask is scored alone); dynamic NTK depends on the sequence length, and the number of
    remembered window queries (fewer than the window early on) on the sequence: both join the key."""
    pos_type = type(seq.positions)
    plain = (pos_type.logits is PositionPolicy.logits and pos_type.extra_mask is PositionPolicy.extra_mask
             and seq.positions.stores_rotated_keys)
    rope = seq._rotary_for(rotary).rope
    dynamic = newest + 1 if rope.rope_type == "dynamic" else 0
    window = seq.stacked_queries(layers[:1])[1].shape[0] if seq.query_window else 0
    return (seq.retain, seq.cfg, rope, dynamic, window) if plain else (id(seq),)


def evict_stacked(group: list[Due], rotary: Rotary) -> None:
    """Evict the due layers of every sequence in ``group`` (one retain policy, see :func:`_group_key`) in one
    pass over their rows, stacked sequence-major then layer-major."""
    pairs = [(seq.rows, layer) for seq, layers, _ in group for layer in layers]
    view = gather_rows(pairs)
    first = group[0][0]
    if len(group) == 1:
        seq, layers, newest = group[0]
        window_attention, window_queries = seq.stacked_window_fns(layers, view, rotary, newest)
    else:
        window_attention, window_queries = _batched_window_fns(group, view, rotary)
    cfg = first.cfg
    kv_view = KVView(keys=view.k, values=view.v, positions=view.pos, valid=view.valid, key_mass=view.score,
                     window_attention=window_attention, layer=-1, num_layers=cfg.num_layers,
                     window_queries=window_queries)
    scores = first.retain.score(kv_view).masked_fill(~view.valid, float("-inf"))
    lengths = [n for rows, layer in pairs for n in rows.lengths[layer]]
    budgets = [b for seq, layers, _ in group for layer in layers for b in seq.head_budgets[layer]]  # type: ignore[index]
    recent_of = {b: first.retain.recent_tokens(b) for b in set(budgets)}
    recent = [recent_of[b] for b in budgets]
    compact_rows(pairs, view, *select_keep_padded(scores, lengths, budgets, first.retain.sinks, recent))
    for seq, layers, _ in group:
        seq.stats.num_evictions += len(layers)


def _batched_window_fns(group: list[Due], view: RowView,
                        rotary: Rotary) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """Window attention (and the window's queries in the keys' frame) of several sequences' stacked rows:
    every row's queries rotated at its own sequence's positions, causal against its own keys."""
    first = group[0][0]
    cfg = first.cfg
    cache: dict[str, Tensor] = {}

    def rotated_queries() -> tuple[Tensor, Tensor]:
        if "q" not in cache:
            qs, ps = [], []
            for seq, layers, _ in group:
                q, p = seq.stacked_queries(layers)  # [R_s, G, W, D], [W]
                qs.append(q)
                ps.append(p[None, :].expand(q.shape[0], -1))
            q, p = torch.cat(qs), torch.cat(ps)  # [R, G, W, D], [R, W]
            rotate_at = first._rotate_fn(rotary, group[0][2] + 1)  # same RoPE for the group (dynamic: same length)
            cache["q"], cache["p"] = rotate_at(q, p[:, None, :]), p
        return cache["q"], cache["p"]

    def window_attention() -> Tensor:
        q_rot, p = rotated_queries()
        logits = torch.matmul(q_rot, view.k[:, None].transpose(-1, -2))  # [R, G, W, L]
        mask = view.valid[:, None, :] & (p[:, :, None] >= view.pos[:, None, :])  # [R, W, L]
        return attention_probs(logits, mask, cfg.scale, cfg.attn_logit_softcapping)

    return window_attention, lambda: rotated_queries()[0]
