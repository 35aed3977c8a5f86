"""``lsh_sampling`` select (MagicPIG): SimHash collisions choose the sample, importance weights correct it.

Checked against brute force on hand-built pools (shuffled blocks, ragged rows, B > 1, GQA) and against exact
attention (``paged_decode_torch``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from longctx.engine.fast_decode import paged_decode_torch
from longctx.kv.select.attend import attend_selection, dense_as_paged
from longctx.kv.select.base import PagedRows, Selection, SelectState
from longctx.kv.select.lsh_sampling import LSHSampling, hash_codes, hyperplanes, sample_probability

D, BS, G = 8, 4, 2  # head dim, block size, query heads per kv head
SCALE = D ** -0.5
LAYER = 1  # a sampled layer under dense_every=0 and the default alike


def make_rows(lengths: list[list[int]], cap: int, seed: int) -> PagedRows:
    """B x H rows (lengths[b][h] tokens, cap blocks each) in a pool of shuffled blocks plus spare ones."""
    g = torch.Generator().manual_seed(seed)
    bsz, h = len(lengths), len(lengths[0])
    num_blocks = bsz * h * cap + 3
    tables = torch.randperm(num_blocks, generator=g)[: bsz * h * cap].view(bsz, h, cap)
    k = torch.randn(num_blocks, BS, D, generator=g)
    v = torch.randn(num_blocks, BS, D, generator=g)
    pos = torch.zeros(num_blocks, BS, dtype=torch.int64)
    return PagedRows(k, v, pos, tables, torch.tensor(lengths))


def slot(rows: PagedRows, b: int, h: int, i: int) -> tuple[int, int]:
    return int(rows.block_tables[b, h, i // BS]), i % BS


def row_kv(rows: PagedRows, b: int, h: int) -> tuple[Tensor, Tensor]:
    n = int(rows.lengths[b, h])
    idx = torch.arange(n)
    blocks = rows.block_tables[b, h, idx // BS]
    return rows.k[blocks, idx % BS], rows.v[blocks, idx % BS]


def fresh(bsz: int) -> SelectState:
    return SelectState([{} for _ in range(bsz)], {}, [0] * bsz, 4)


def method(**kw) -> LSHSampling:  # noqa: ANN003
    base = {"bits": 3, "tables": 12, "sinks": 1, "window": 2, "center": False, "eps": 0.0, "dense_every": 0}
    return LSHSampling(**{**base, **kw})


def per_head(sel: Selection, b: int, h: int, g: int) -> dict[int, float]:
    """Token -> log-weight of what query head g of row (b, h) sees (finite log-weights only)."""
    assert sel.tokens is not None and sel.log_weights is not None
    out = {}
    for j, t in enumerate(sel.tokens[b, h].tolist()):
        w = float(sel.log_weights[b, h, g, j])
        if t >= 0 and w > float("-inf"):
            out[t] = w
    return out


def brute(m: LSHSampling, q: Tensor, rows: PagedRows, b: int, h: int, g: int) -> dict[int, float]:
    """Brute force: the tokens query head g of row (b, h) reads and their log-weights (center=False)."""
    k, _ = row_kv(rows, b, h)
    n = k.shape[0]
    planes = hyperplanes(m.seed, LAYER, D, m.bits * m.tables, k.device)
    qv = q[b, h * G + g]
    hits = (hash_codes(k, planes, m.bits, m.tables) == hash_codes(qv, planes, m.bits, m.tables)).sum(-1)
    out = {}
    for i in range(n):
        if i < m.sinks or i >= n - m.window:
            out[i] = 0.0
        elif int(hits[i]) >= m.min_collisions:
            cos = torch.dot(qv.double(), k[i].double()) / (qv.double().norm() * k[i].double().norm())
            u = float(sample_probability(cos, m.bits, m.tables, m.min_collisions))
            out[i] = -math.log(u + m.eps)
    return out


# ---- parameters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"bits": 0}, {"bits": 32}, {"tables": 0}, {"min_collisions": 0},
                                {"min_collisions": 151}, {"sinks": -1}, {"window": 0}, {"eps": -1.0},
                                {"eps": float("nan")}, {"max_tokens": 10}, {"dense_every": -1}, {"seed": -1}])
def test_bad_parameters_raise(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        LSHSampling(**kw)


def test_defaults_follow_magicpig() -> None:
    m = LSHSampling()
    assert (m.bits, m.tables, m.min_collisions, m.sinks, m.window, m.dense_every) == (10, 150, 2, 4, 64, 16)
    assert m.method_name == "lsh_sampling" and m.stateful and not m.reads_all


# ---- the sampling probability -------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "tables", "m"), [(10, 150, 2), (3, 12, 2), (1, 5, 1), (4, 20, 5), (2, 3, 3)])
def test_sample_probability_is_the_binomial_tail(bits: int, tables: int, m: int) -> None:
    cos = torch.tensor([-1.0, -0.9, -0.3, 0.0, 0.2, 0.5, 0.8, 0.95, 0.999, 1.0], dtype=torch.float64)
    u = sample_probability(cos, bits, tables, m)
    for c, got in zip(cos.tolist(), u.tolist(), strict=True):
        s = (1 - math.acos(c) / math.pi) ** bits
        want = sum(math.comb(tables, j) * s**j * (1 - s) ** (tables - j) for j in range(m, tables + 1))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert float(u[-1]) == 1.0 and float(u[0]) == 0.0
    assert bool((u[1:] >= u[:-1]).all())  # closer keys are sampled more often


def test_magicpig_two_table_formula() -> None:
    """MagicPIG's closed form for m = 2: 1 - (1 - p^K)^L - L p^K (1 - p^K)^(L - 1)."""
    cos = torch.linspace(-0.5, 0.99, 9, dtype=torch.float64)
    p = 1 - torch.arccos(cos) / math.pi
    s = p**10
    want = 1 - (1 - s) ** 150 - 150 * s * (1 - s) ** 149
    torch.testing.assert_close(sample_probability(cos, 10, 150, 2), want, rtol=1e-7, atol=1e-12)


# ---- the selection ------------------------------------------------------------------------------------------


def test_key_in_the_query_direction_is_always_sampled() -> None:
    lengths = [[20, 13], [9, 17]]
    for seed in range(6):
        rows = make_rows(lengths, cap=6, seed=seed)
        q = torch.randn(2, 2 * G, D, generator=torch.Generator().manual_seed(seed))
        targets = {(0, 0, 0): 7, (0, 1, 1): 5, (1, 0, 1): 3, (1, 1, 0): 10}
        for (b, h, g), i in targets.items():
            q[b, h * G + g] = 2.0 * rows.k[slot(rows, b, h, i)]  # θ = 0: same signs in every table
        m = method(bits=10, tables=30, seed=seed)
        sel = m.select(LAYER, q, rows, fresh(2))
        for (b, h, g), i in targets.items():
            seen = per_head(sel, b, h, g)
            assert i in seen and seen[i] == pytest.approx(0.0, abs=1e-3)  # u = 1 up to the angle's rounding


@pytest.mark.parametrize("bits", [3, 10])
def test_selection_and_weights_match_brute_force(bits: int) -> None:
    lengths = [[23, 11], [6, 19], [16, 16]]
    rows = make_rows(lengths, cap=6, seed=3)
    q = torch.randn(3, 2 * G, D, generator=torch.Generator().manual_seed(4))
    m = method(bits=bits, tables=40 if bits == 10 else 12, seed=5)
    sel = m.select(LAYER, q, rows, fresh(3))
    assert sel.tokens is not None and sel.log_weights is not None
    assert sel.tokens.shape == (3, 2, 24) and sel.log_weights.shape == (3, 2, G, 24)
    for b in range(3):
        for h in range(2):
            tok = [t for t in sel.tokens[b, h].tolist() if t >= 0]
            assert len(tok) == len(set(tok)) and all(t < lengths[b][h] for t in tok)
            union = set()
            for g in range(G):
                want, got = brute(m, q, rows, b, h, g), per_head(sel, b, h, g)
                assert got.keys() == want.keys()
                for t in want:
                    assert got[t] == pytest.approx(want[t], rel=1e-5, abs=1e-6)
                union |= want.keys()
            assert set(tok) == union  # the row reads exactly the union of its heads' samples


def test_token_sampled_for_another_head_has_zero_weight() -> None:
    rows = make_rows([[24]], cap=6, seed=8)
    q = torch.randn(1, G, D, generator=torch.Generator().manual_seed(9))
    a = 11
    q[0, 0] = 2.0 * rows.k[slot(rows, 0, 0, a)]  # head 0 looks straight at token a
    q[0, 1] = -2.0 * rows.k[slot(rows, 0, 0, a)]  # head 1 looks away: no table collides
    m = method(bits=4, tables=16, seed=1)
    sel = m.select(LAYER, q, rows, fresh(1))
    assert sel.tokens is not None and sel.log_weights is not None
    j = sel.tokens[0, 0].tolist().index(a)
    assert sel.log_weights[0, 0, 0, j] > -1e-3
    assert sel.log_weights[0, 0, 1, j] == float("-inf")
    # each head's output is attention over its own sample set with its own weights
    out = attend_selection(q, rows, sel, SCALE, None, paged_decode_torch)
    k, v = row_kv(rows, 0, 0)
    for g in range(G):
        seen = per_head(sel, 0, 0, g)
        idx = torch.tensor(sorted(seen))
        logits = q[0, g] @ k[idx].T * SCALE + torch.tensor([seen[int(i)] for i in idx])
        torch.testing.assert_close(out[0, g], torch.softmax(logits, -1) @ v[idx], rtol=1e-5, atol=1e-6)


def test_sinks_and_window_covering_rows_give_exact_attention() -> None:
    # every slot covered: the method reads everything
    rows = make_rows([[7, 3], [8, 5]], cap=2, seed=2)
    q = torch.randn(2, 2 * G, D, generator=torch.Generator().manual_seed(2))
    m = method(sinks=2, window=6)
    state = fresh(2)
    assert m.select(LAYER, q, rows, state) is None and m.extra_bytes_read(LAYER, rows, state) is None
    # ragged rows inside a larger capacity, each covered: every token exact, weight 0
    rows = make_rows([[7, 3], [8, 5]], cap=5, seed=2)
    sel = m.select(LAYER, q, rows, fresh(2))
    assert sel is not None and sel.tokens is not None and sel.log_weights is not None
    assert ((sel.tokens >= 0).sum(-1) == rows.lengths).all()
    assert (sel.log_weights == 0).all()
    exact = paged_decode_torch(q, rows.k, rows.v, rows.block_tables, rows.lengths, SCALE)
    torch.testing.assert_close(attend_selection(q, rows, sel, SCALE, None, paged_decode_torch), exact,
                               rtol=1e-5, atol=1e-6)


def test_estimate_is_unbiased_over_seeds() -> None:
    """Σ e^(l + log w) and Σ e^(l + log w) v over the sample are unbiased for the exact sums (Horvitz-Thompson);
    their ratio, the attention estimate, approaches exact attention."""
    n = 40
    rows = make_rows([[n]], cap=n // BS, seed=11)
    q = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(12)) * 1.5
    k, v = row_kv(rows, 0, 0)
    logits = q[0, 0] @ k.T * SCALE
    z, zo = logits.exp().sum(), logits.exp() @ v
    exact = zo / z
    zs, zos, outs, reads = [], [], [], []
    for seed in range(200):
        m = LSHSampling(bits=2, tables=6, sinks=1, window=1, center=False, eps=0.0, dense_every=0, seed=seed)
        sel = m.select(LAYER, q, rows, fresh(1))
        assert sel is not None and sel.tokens is not None and sel.log_weights is not None
        ok = sel.tokens[0, 0] >= 0
        t = sel.tokens[0, 0][ok]
        w = (logits[t] + sel.log_weights[0, 0, 0][ok]).exp()
        zs.append(w.sum())
        zos.append(w @ v[t])
        reads.append(len(t))
        outs.append(attend_selection(q, rows, sel, SCALE, None, paged_decode_torch)[0, 0])
    assert sum(reads) / len(reads) < 0.9 * n  # a real sample, not the whole row
    zbar, zobar = torch.stack(zs).mean(), torch.stack(zos).mean(0)
    assert float(zbar) == pytest.approx(float(z), rel=0.05)
    torch.testing.assert_close(zobar, zo, rtol=0.0, atol=0.08 * float(zo.norm()))
    torch.testing.assert_close(torch.stack(outs).mean(0), exact, rtol=0.0, atol=0.08 * float(exact.norm()) + 0.02)


def test_deterministic_for_a_seed() -> None:
    rows = make_rows([[22, 15], [18, 9]], cap=6, seed=6)
    q = torch.randn(2, 2 * G, D, generator=torch.Generator().manual_seed(6))
    a = method(seed=3).select(LAYER, q, rows, fresh(2))
    b = method(seed=3).select(LAYER, q, rows, fresh(2))
    c = method(seed=4).select(LAYER, q, rows, fresh(2))
    assert a is not None and b is not None and c is not None
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_weights, b.log_weights)
    assert not (torch.equal(a.tokens, c.tokens) and torch.equal(a.log_weights, c.log_weights))


def test_batched_rows_select_like_each_sequence_alone() -> None:
    lengths = [[21, 14], [10, 19]]
    rows = make_rows(lengths, cap=6, seed=13)
    q = torch.randn(2, 2 * G, D, generator=torch.Generator().manual_seed(13))
    m = method(center=True, seed=2)
    sel = m.select(LAYER, q, rows, fresh(2))
    for b in range(2):
        ks, vs = zip(*(row_kv(rows, b, h) for h in range(2)), strict=True)
        n = max(lengths[b])
        k = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[0])) for x in ks])
        v = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[0])) for x in vs])
        one = dense_as_paged(k, v, torch.zeros(2, n, dtype=torch.long), torch.tensor(lengths[b]), BS, False)
        alone = m.select(LAYER, q[b: b + 1], one, fresh(1))
        for h in range(2):
            for g in range(G):
                got, want = per_head(sel, b, h, g), per_head(alone, 0, h, g)
                assert got.keys() == want.keys()
                assert all(got[t] == pytest.approx(want[t], rel=1e-5, abs=1e-6) for t in want)


def test_max_tokens_bounds_the_read_and_keeps_exact_tokens() -> None:
    rows = make_rows([[24, 20]], cap=6, seed=14)
    q = torch.randn(1, 2 * G, D, generator=torch.Generator().manual_seed(14))
    m = method(bits=1, tables=8, min_collisions=1, max_tokens=6)  # nearly everything collides
    sel = m.select(LAYER, q, rows, fresh(1))
    assert sel is not None and sel.tokens is not None and sel.tokens.shape[-1] == 6
    for h, n in enumerate([24, 20]):
        tok = set(sel.tokens[0, h].tolist())
        assert {0, n - 2, n - 1} <= tok and len(tok - {-1}) == 6


# ---- the kept codes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_codes_appended_step_by_step_equal_codes_from_scratch(center: bool, monkeypatch) -> None:  # noqa: ANN001
    start = [[9, 5], [13, 7]]
    rows = make_rows(start, cap=6, seed=15)
    q = torch.randn(2, 2 * G, D, generator=torch.Generator().manual_seed(15))
    m = method(center=center, seed=7)
    calls = []
    original = LSHSampling._hash_rows

    def counting(self, rows, tables, lengths, planes):  # noqa: ANN001, ANN202
        calls.append(tables.shape[0])
        return original(self, rows, tables, lengths, planes)

    monkeypatch.setattr(LSHSampling, "_hash_rows", counting)
    state = fresh(2)
    for step in range(8):  # each decode step appends one token to every row
        rows.lengths = torch.tensor(start) + step
        state.steps = [step, step]
        m.select(LAYER, q, rows, state)
    assert calls == [2]  # hashed once, when the state was empty; then only the newest tokens
    key = ("lsh_sampling", LAYER)
    assert state.per_seq[1][key]["codes"] is state.per_seq[0][key]["codes"]  # one batch tensor, no copies
    planes = hyperplanes(7, LAYER, D, m.bits * m.tables, rows.k.device)
    for b in range(2):
        entry = state.per_seq[b][key]
        for h in range(2):
            k, _ = row_kv(rows, b, h)
            if center:
                k = k - entry["mean"][entry["row"], h]
            want = hash_codes(k, planes, m.bits, m.tables)
            assert torch.equal(entry["codes"][entry["row"], h, : k.shape[0]], want)
    if center:  # the mean is the one taken when the codes were built: between sinks and window of the row
        k, _ = row_kv(rows, 0, 1)
        torch.testing.assert_close(state.per_seq[0][("lsh_sampling", LAYER)]["mean"][0, 1], k[1:3].mean(0))


def test_regrouped_sequences_reuse_their_codes_and_stale_state_is_rebuilt(monkeypatch) -> None:  # noqa: ANN001
    rows = make_rows([[9, 5], [13, 7]], cap=6, seed=16)
    q = torch.randn(2, 2 * G, D, generator=torch.Generator().manual_seed(16))
    m = method(seed=1)
    calls = []
    original = LSHSampling._hash_rows

    def counting(self, rows, tables, lengths, planes):  # noqa: ANN001, ANN202
        calls.append(tables.shape[0])
        return original(self, rows, tables, lengths, planes)

    monkeypatch.setattr(LSHSampling, "_hash_rows", counting)
    state = fresh(2)
    m.select(LAYER, q, rows, state)
    # the next step runs the two sequences in the other order: kept codes move, nothing is rehashed
    swapped = PagedRows(rows.k, rows.v, rows.pos, rows.block_tables.flip(0), rows.lengths.flip(0) + 1)
    state2 = SelectState(state.per_seq[::-1], {}, [1, 1], 4)
    sel = m.select(LAYER, q.flip(0), swapped, state2)
    assert calls == [2]
    again = m.select(LAYER, q.flip(0), swapped, fresh(2))  # from scratch
    assert calls == [2, 2]
    assert torch.equal(sel.tokens, again.tokens) and torch.equal(sel.log_weights, again.log_weights)
    # a sequence whose state missed a step is rehashed (alone)
    state2.steps = [3, 2]
    m.select(LAYER, q.flip(0), swapped, state2)
    assert calls == [2, 2, 1]


def test_dense_layers_and_bytes_read() -> None:
    rows = make_rows([[30, 21]], cap=20, seed=17)
    q = torch.randn(1, 2 * G, D, generator=torch.Generator().manual_seed(17))
    m = LSHSampling(window=8)  # defaults otherwise: layers 0, 16, 32, ... read everything
    state = fresh(1)
    assert m.select(0, q, rows, state) is None and m.select(16, q, rows, state) is None
    assert m.extra_bytes_read(16, rows, state) is None
    assert m.select(1, q, rows, state) is not None
    nbytes = m.extra_bytes_read(1, rows, state)
    assert nbytes is not None and nbytes.tolist() == [[30 * 150 * 2 + 4 * D, 21 * 150 * 2 + 4 * D]]  # int16 codes
    small = LSHSampling(bits=8, tables=5, window=8, center=False)
    assert small.extra_bytes_read(1, rows, state).tolist() == [[30 * 5, 21 * 5]]  # uint8 codes
