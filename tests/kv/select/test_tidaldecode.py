"""``tidaldecode`` select: selecting layers attend fully and choose; the layers after them read only the chosen
positions (mapped onto their own rows) plus the newest token. Also home of the small paged-rows builders the
select tests share (hand-built pools: shuffled blocks, ragged rows, B > 1, GQA)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from longctx.engine.fast_decode import paged_decode_torch
from longctx.kv.select.attend import attend_selection, dense_as_paged
from longctx.kv.select.base import PagedRows, Selection, SelectState
from longctx.kv.select.tidaldecode import TidalDecode

D, BS, CAP, G = 8, 4, 6, 2  # head dim, block size, blocks per row, query heads per kv head
SCALE = D ** -0.5


def paged_rows(lengths: list[list[int]], seed: int, positions: list[list[list[int]]] | None = None,
               cap: int = CAP) -> PagedRows:
    """B x H rows (lengths[b][h] tokens) in a pool of shuffled blocks (plus spare ones); positions[b][h] lists each
    row's ascending original positions (default: the token index)."""
    g = torch.Generator().manual_seed(seed)
    bsz, h = len(lengths), len(lengths[0])
    num_blocks = bsz * h * cap + 3
    tables = torch.randperm(num_blocks, generator=g)[: bsz * h * cap].view(bsz, h, cap)
    k = torch.randn(num_blocks, BS, D, generator=g)
    v = torch.randn(num_blocks, BS, D, generator=g)
    pos = torch.full((num_blocks, BS), 10**6, dtype=torch.int64)  # stale values past each row's length
    for b in range(bsz):
        for hh in range(h):
            p = positions[b][hh] if positions is not None else list(range(lengths[b][hh]))
            for i, x in enumerate(p):
                pos[tables[b, hh, i // BS], i % BS] = x
    return PagedRows(k, v, pos, tables, torch.tensor(lengths))


def row_kv(rows: PagedRows, b: int, h: int) -> tuple[Tensor, Tensor]:
    """The K and V [length, D] of row (b, h)."""
    n = int(rows.lengths[b, h])
    idx = torch.arange(n)
    blocks = rows.block_tables[b, h, idx // BS]
    return rows.k[blocks, idx % BS], rows.v[blocks, idx % BS]


def group_probs(q: Tensor, rows: PagedRows, b: int, h: int) -> list[float]:
    """Row (b, h)'s softmax attention probabilities summed over its group's query heads (brute force)."""
    k, _ = row_kv(rows, b, h)
    total = torch.zeros(k.shape[0])
    for g in range(G):
        total += torch.softmax(q[b, h * G + g] @ k.T * SCALE, dim=-1)
    return total.tolist()


def ranked(scores: list[float], k: int, force: int | None = None) -> set[int]:
    """The k best indices by score (ties to the lower index), ``force`` always among them."""
    order = sorted(range(len(scores)), key=lambda i: (i != force, -scores[i], i))
    return set(order[:k])


def row_sets(sel: Selection) -> list[list[set[int]]]:
    tok = sel.tokens
    assert tok is not None
    return [[{int(x) for x in tok[b, h] if x >= 0} for h in range(tok.shape[1])] for b in range(tok.shape[0])]


def attend_sets(q: Tensor, rows: PagedRows, sets: list[list[set[int]]]) -> Tensor:
    """Brute-force attention of q [B, Hq, D] over the given token sets of each row."""
    out = torch.zeros_like(q)
    for b, per_head in enumerate(sets):
        for h, chosen in enumerate(per_head):
            k, v = row_kv(rows, b, h)
            idx = torch.tensor(sorted(chosen))
            for g in range(G):
                p = torch.softmax(q[b, h * G + g] @ k[idx].T * SCALE, dim=-1)
                out[b, h * G + g] = p @ v[idx]
    return out


def attend(q: Tensor, rows: PagedRows, sel: Selection | None) -> Tensor:
    return attend_selection(q, rows, sel, SCALE, None, paged_decode_torch)


LENGTHS = [[24, 17], [9, 13], [20, 6]]


def queries(seed: int, bsz: int = 3, h: int = 2) -> Tensor:
    return torch.randn(bsz, h * G, D, generator=torch.Generator().manual_seed(seed))


def test_full_budget_reads_all_everywhere() -> None:
    rows, q = paged_rows(LENGTHS, 0), queries(1)
    want = paged_decode_torch(q, rows.k, rows.v, rows.block_tables, rows.lengths, SCALE)
    for tokens in (CAP * BS, 10 * CAP * BS):
        method, state = TidalDecode(select_layers="1", tokens=tokens), SelectState(num_layers=4)
        for layer in range(4):
            sel = method.select(layer, q, rows, state)
            assert sel is None
            assert torch.equal(attend(q, rows, sel), want)
            assert method.extra_bytes_read(layer, rows, state) is None
    sel = TidalDecode(select_layers="0", tokens=CAP * BS - 1)
    state = SelectState(num_layers=2)
    assert sel.select(0, q, rows, state) is None and sel.select(1, q, rows, state) is not None


def test_layer_roles_and_chosen_tokens() -> None:
    """Layers before the first selecting layer read all; selecting layers read all and choose the top tokens of
    their own scores (group-summed probabilities, newest forced); the others read the latest choice."""
    method, state = TidalDecode(select_layers="1,3", tokens=5), SelectState(num_layers=5)
    layer_rows = [paged_rows(LENGTHS, 10 + layer) for layer in range(5)]
    q = queries(2)
    assert method.select(0, q, layer_rows[0], state) is None and "tidaldecode" not in state.step
    chosen = None
    for layer in range(1, 5):
        rows = layer_rows[layer]
        sel = method.select(layer, q, rows, state)
        if layer in (1, 3):
            assert sel is None
            chosen = [[ranked(group_probs(q, rows, b, h), 5, force=LENGTHS[b][h] - 1) for h in range(2)]
                      for b in range(3)]
            assert method.extra_bytes_read(layer, rows, state) is None
            continue
        assert sel is not None and chosen is not None
        assert row_sets(sel) == chosen  # positions == indices in these rows
        torch.testing.assert_close(attend(q, rows, sel), attend_sets(q, rows, chosen), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.extra_bytes_read(layer, rows, state), rows.lengths * 8)


def test_positions_mapped_onto_rows_that_differ() -> None:
    """The following layer keeps different tokens (eviction): each chosen position is read where that row keeps
    it, absent ones are not read, and the newest token is always read."""
    method, state = TidalDecode(select_layers="2", tokens=6), SelectState(num_layers=4)
    q = queries(3)
    sel_rows = paged_rows(LENGTHS, 20)
    assert method.select(2, q, sel_rows, state) is None
    chosen = [[ranked(group_probs(q, sel_rows, b, h), 6, force=LENGTHS[b][h] - 1) for h in range(2)]
              for b in range(3)]
    g = torch.Generator().manual_seed(4)
    kept = []  # each row of layer 3 keeps a random ascending subset of the positions, the newest included
    for b in range(3):
        per_head = []
        for h in range(2):
            n = LENGTHS[b][h]
            keep = (torch.rand(n - 1, generator=g) < 0.6).nonzero().flatten().tolist()
            per_head.append(keep + [n - 1])
        kept.append(per_head)
    lengths = [[len(p) for p in per_head] for per_head in kept]
    rows = paged_rows(lengths, 21, positions=kept)
    sel = method.select(3, q, rows, state)
    assert sel is not None
    want = [[{kept[b][h].index(p) for p in chosen[b][h] if p in kept[b][h]} | {lengths[b][h] - 1}
             for h in range(2)] for b in range(3)]
    assert row_sets(sel) == want
    assert any(len(want[b][h]) < len(chosen[b][h]) for b in range(3) for h in range(2))  # some were evicted
    torch.testing.assert_close(attend(q, rows, sel), attend_sets(q, rows, want), rtol=1e-5, atol=1e-6)


def test_ties_go_to_earlier_tokens_deterministically() -> None:
    rows, q = paged_rows(LENGTHS, 30), torch.zeros(3, 2 * G, D)  # every score equal
    picks = []
    for _ in range(2):
        method, state = TidalDecode(select_layers="0", tokens=4), SelectState(num_layers=2)
        assert method.select(0, q, rows, state) is None
        sel = method.select(1, q, rows, state)
        assert sel is not None
        picks.append(sel.tokens)
    assert torch.equal(picks[0], picks[1])
    assert row_sets(Selection(tokens=picks[0])) == [[{0, 1, 2, n - 1} for n in per] for per in LENGTHS]


def test_batched_rows_choose_as_the_per_sequence_path() -> None:
    """The batched pool and each sequence's gathered rows (``dense_as_paged``) choose the same tokens."""
    method = TidalDecode(select_layers="0", tokens=7)
    rows0, rows1, q = paged_rows(LENGTHS, 40), paged_rows(LENGTHS, 41), queries(5)
    state = SelectState(num_layers=2)
    method.select(0, q, rows0, state)
    batched = row_sets(method.select(1, q, rows1, state))
    for b in range(3):
        dense = []
        for rows in (rows0, rows1):
            n = max(LENGTHS[b])
            ks, vs = [], []
            for h in range(2):
                k, v = row_kv(rows, b, h)
                ks.append(torch.nn.functional.pad(k, (0, 0, 0, n - k.shape[0])))
                vs.append(torch.nn.functional.pad(v, (0, 0, 0, n - v.shape[0])))
            pos = torch.arange(n).repeat(2, 1)
            dense.append(dense_as_paged(torch.stack(ks), torch.stack(vs), pos, rows.lengths[b], BS, summaries=False))
        one = SelectState(num_layers=2)
        method.select(0, q[b: b + 1], dense[0], one)
        assert row_sets(method.select(1, q[b: b + 1], dense[1], one)) == [batched[b]]


def test_layers_default_and_bad_params() -> None:
    auto = TidalDecode()
    assert auto.tokens == 256
    assert auto.layers(32) == (2, 13) and auto.layers(28) == (2, 11) and auto.layers(4) == (2,)
    assert auto.layers(8) == (2, 3)
    assert auto.layers(2) == ()  # too shallow: every layer is dense
    with pytest.raises(ValueError, match="num_layers"):
        auto.layers(0)
    assert TidalDecode(select_layers=" 2, 13").layers(32) == (2, 13)
    with pytest.raises(ValueError, match="does not exist"):
        TidalDecode(select_layers="2,13").layers(8)
    for bad in ("", "2,x", "-1", "3,2", "2,2", "2;13"):
        with pytest.raises(ValueError, match="select_layers must be"):
            TidalDecode(select_layers=bad)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        TidalDecode(tokens=0)
