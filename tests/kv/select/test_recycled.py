"""``recycled`` select: a full attention step every ``stride`` steps per sequence records each row's top tokens;
the steps between read exactly those plus the tokens added since (the newest always among them)."""

from __future__ import annotations

import pytest
import torch

from longctx.kv.select.base import PagedRows, SelectState
from longctx.kv.select.recycled import Recycled
from tests.kv.select.test_tidaldecode import (
    D,
    G,
    attend,
    attend_sets,
    group_probs,
    paged_rows,
    queries,
    ranked,
    row_sets,
)

CAP = 8  # blocks per row: 32 tokens


def grown(rows: PagedRows, lengths: list[list[int]]) -> PagedRows:
    """The same pool with rows of ``lengths`` tokens (a later decode step)."""
    return PagedRows(rows.k, rows.v, rows.pos, rows.block_tables, torch.tensor(lengths))


def test_full_steps_every_stride_per_sequence_and_reads_in_between() -> None:
    """Three sequences at different phases (two restart after a compaction cleared their state), two layers with
    different rows: each sequence's full steps fall every ``stride`` of its own steps; between them each row reads
    exactly its recorded top tokens plus every token added since the full step."""
    method = Recycled(stride=3, tokens=4)
    base = [[10, 7], [12, 12], [5, 9]]
    start = [0, 4, 2]
    num_steps = 8
    final = [[n + num_steps for n in per] for per in base]
    layer_rows = [paged_rows(final, 50, cap=CAP), paged_rows(final, 51, cap=CAP)]
    per_seq: list[dict] = [{}, {}, {}]
    last_full = [None, None, None]
    recorded: list[dict] = [{}, {}, {}]  # b -> layer -> (per-head sets, lengths at the full step)
    full_steps: list[list[int]] = [[], [], []]
    mixed = 0
    for t in range(num_steps):
        for b in {1: [1], 5: [2]}.get(t, []):
            per_seq[b].clear()  # the engine compacted sequence b's rows
            last_full[b] = None
        steps = [s + t for s in start]
        lengths = [[n + t for n in per] for per in base]
        full = [last_full[b] is None or steps[b] - last_full[b] >= 3 for b in range(3)]
        for b in range(3):
            if full[b]:
                last_full[b] = steps[b]
                full_steps[b].append(steps[b])
        q = queries(100 + t)
        for layer, all_rows in enumerate(layer_rows):
            rows = grown(all_rows, lengths)
            state = SelectState(per_seq=per_seq, steps=steps, num_layers=2)
            sel = method.select(layer, q, rows, state)
            assert (sel is None) == all(full)
            want = []
            for b in range(3):
                if full[b]:
                    recorded[b][layer] = ([ranked(group_probs(q, rows, b, h), 4) for h in range(2)], lengths[b])
                    want.append([set(range(n)) for n in lengths[b]])
                else:
                    sets, length0 = recorded[b][layer]
                    want.append([sets[h] | set(range(length0[h], lengths[b][h])) for h in range(2)])
                record = per_seq[b][layer]
                assert record["tokens"].dtype == torch.int64 and record["tokens"].shape == (2, 4)
                assert {int(x) for x in record["tokens"][0]} == recorded[b][layer][0][0]
            if sel is not None:
                assert row_sets(sel) == want
                mixed += any(full)
            torch.testing.assert_close(attend(q, rows, sel), attend_sets(q, rows, want), rtol=1e-5, atol=1e-6)
            assert method.extra_bytes_read(layer, rows, state) is None
    assert full_steps == [[0, 3, 6], [4, 5, 8, 11], [2, 5, 7]]
    assert mixed >= 3  # steps where some rows were full and others recycled


def test_full_budget_reads_all_and_records_nothing() -> None:
    rows, q = paged_rows([[24, 17], [9, 13]], 60, cap=6), queries(61, bsz=2)
    per_seq: list[dict] = [{}, {}]
    for tokens in (24, 1000):
        state = SelectState(per_seq=per_seq, steps=[0, 3], num_layers=1)
        assert Recycled(stride=4, tokens=tokens).select(0, q, rows, state) is None
    assert per_seq == [{}, {}]


def test_stride_one_is_always_full() -> None:
    base = [[10, 7], [6, 12]]
    rows = paged_rows([[n + 3 for n in per] for per in base], 70, cap=CAP)
    per_seq: list[dict] = [{}, {}]
    for t in range(3):
        state = SelectState(per_seq=per_seq, steps=[t, t + 1], num_layers=1)
        lengths = [[n + t for n in per] for per in base]
        assert Recycled(stride=1, tokens=3).select(0, queries(t, bsz=2), grown(rows, lengths), state) is None
        assert [int(d[0]["step"]) for d in per_seq] == [t, t + 1]


def test_ties_record_earlier_tokens_deterministically() -> None:
    base = [[10, 7], [6, 12]]
    rows = paged_rows([[n + 2 for n in per] for per in base], 80, cap=CAP)
    method = Recycled(stride=5, tokens=4)
    picks = []
    for _ in range(2):
        per_seq: list[dict] = [{}, {}]
        state = SelectState(per_seq=per_seq, steps=[0, 0], num_layers=1)
        zero = torch.zeros(2, 2 * G, D)  # every score equal
        assert method.select(0, zero, grown(rows, base), state) is None
        assert method.select(0, zero, grown(rows, base), state) is None  # the same step again: still full
        later = [[n + 2 for n in per] for per in base]
        state = SelectState(per_seq=per_seq, steps=[2, 2], num_layers=1)
        sel = method.select(0, queries(81, bsz=2), grown(rows, later), state)
        assert sel is not None
        picks.append(sel.tokens)
    assert torch.equal(picks[0], picks[1])
    assert row_sets(sel) == [[{0, 1, 2, 3, n, n + 1} for n in per] for per in base]


def test_bad_params() -> None:
    default = Recycled()
    assert (default.stride, default.tokens) == (50, 4096)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        Recycled(stride=0)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        Recycled(tokens=0)
