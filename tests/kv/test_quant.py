"""KIVI-style KV quantization (``quant=int8`` / ``int4``): the math, the rows, and the engine.

Math: per-element error of every quantize -> dequantize round trip is at most half a quantization
step, int4 codes pack two per byte losslessly. Rows: quantized tokens really move into the
quantized pool (fp blocks freed, bytes counted at their real size), eviction inside the quantized
prefix is lossless, nothing leaks. Engine (tiny llama, ~200-token prompt): int8 logits stay close to
fp, int4 is worse but finite, int4 holds about a quarter of fp16's bytes for what it quantizes,
quantization composes with eviction, and a residual covering the whole run changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.errors import OutOfBlocksError
from longctx.kv.pool import BlockPool
from longctx.kv.quant.kivi import (
    Int4KV,
    Int8KV,
    dequantize_keys,
    dequantize_values,
    pack_int4,
    quantize_keys,
    quantize_values,
    unpack_int4,
)
from longctx.kv.rows import RowSet
from longctx.kv.spec import KVSpec

PROMPT_LEN = 200


def random_kv(*shape: int, seed: int = 0) -> torch.Tensor:
    """Normal data with a few outlier channels (what keys look like) and a shifted mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2 + 0.5
    x[..., :: max(shape[-1] // 4, 1)] *= 10
    return x


# ---- the math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_key_round_trip_error_is_at_most_half_a_step_per_channel(bits: int) -> None:
    k = random_kv(3, 64, 32)  # [n, T, D]
    codes, scale, zero = quantize_keys(k, bits, group=32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.shape == zero.shape == (3, 2, 32) and scale.dtype == torch.float16
    deq = dequantize_keys(codes, scale, zero, group=32)
    err = (deq - k).abs()
    half_step = scale.float().repeat_interleave(32, dim=1) / 2  # [n, T, D]
    rng = k.unflatten(1, (2, 32)).amax(2) - k.unflatten(1, (2, 32)).amin(2)
    assert bool((err <= half_step * (1 + 1e-3) + 1e-6).all()), f"int{bits} keys: max error {err.max():.3g}"
    assert float(err.max()) <= float(rng.max()) / (2**bits - 1), f"int{bits} keys: max error {err.max():.3g}"


@pytest.mark.parametrize("bits", [8, 4])
def test_value_round_trip_error_is_at_most_half_a_step_per_token_group(bits: int) -> None:
    v = random_kv(3, 16, 64, seed=1)  # [n, T, D]
    codes, scale, zero = quantize_values(v, bits, group=16)
    assert scale.shape == zero.shape == (3, 16, 4)
    deq = dequantize_values(codes, scale, zero, group=16)
    err = (deq - v).abs()
    half_step = scale.float().repeat_interleave(16, dim=-1) / 2
    assert bool((err <= half_step * (1 + 1e-3) + 1e-6).all()), f"int{bits} values: max error {err.max():.3g}"
    rel = float((err / v.abs().amax()).max())
    assert rel < (0.005 if bits == 8 else 0.08), f"int{bits} values: max error {err.max():.3g} ({rel:.2%} of max |v|)"


def test_int4_error_is_larger_than_int8_error() -> None:
    k = random_kv(2, 32, 16, seed=2)
    errs = {b: float((dequantize_keys(*quantize_keys(k, b, 32), group=32) - k).abs().max()) for b in (8, 4)}
    assert errs[4] > 4 * errs[8], errs


def test_constant_groups_and_fp16_range_edges_dequantize_without_nan() -> None:
    k = torch.full((1, 32, 8), 3.0)
    k[0, :, 1] = -7e4  # beyond fp16: saturates, stays finite
    deq = dequantize_keys(*quantize_keys(k, 4, 32), group=32)
    assert torch.isfinite(deq).all()
    assert torch.allclose(deq[..., 0], k[..., 0], rtol=1e-3)
    assert float(deq[..., 1].min()) == pytest.approx(-65504.0, rel=1e-3)


def test_int4_pack_unpack_round_trips() -> None:
    codes = torch.randint(0, 16, (5, 7, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (5, 7, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_block_layout_bytes_are_codes_plus_fp16_scales_and_zeros() -> None:
    d, bs = 16, 16
    for cls, code_bytes in ((Int8KV, 1.0), (Int4KV, 0.5)):
        q = cls(group=32, residual=16)
        qbs = q.tokens_per_block(bs)
        assert qbs == 32 and q.value_group(d) == 16  # value groups capped to a divisor of head_dim
        pool = BlockPool(d, block_size=bs)
        qp = pool.quant_pool(q.fields(d, qbs), qbs)
        # keys: codes + one scale and zero per channel per 32 tokens; values: codes + one per token per 16 channels
        expect = 2 * qbs * d * code_bytes + 2 * 2 * d + 2 * 2 * qbs * (d // 16)
        assert qp.bytes_per_block == expect
        assert pool.quant_pool(q.fields(d, qbs), qbs) is qp  # one shared pool per layout


# ---- rows ----------------------------------------------------------------------------------------------
def make_rows(quant: Int8KV | Int4KV, num_layers: int = 2, num_heads: int = 2, d: int = 16,
              bs: int = 4) -> RowSet:
    return RowSet(BlockPool(d, block_size=bs, num_blocks=8, max_blocks=4096), num_layers, num_heads, quant=quant)


def fill(rows: RowSet, layer: int, n: int, start: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    k = random_kv(n, rows.num_kv_heads, rows.pool.head_dim, seed=seed)
    v = random_kv(n, rows.num_kv_heads, rows.pool.head_dim, seed=seed + 100)
    rows.append(layer, k, v, torch.arange(start, start + n))
    return k, v


def test_settle_moves_all_but_the_residual_into_quantized_blocks_and_frees_their_fp_blocks() -> None:
    rows = make_rows(Int8KV(group=8, residual=5))  # quantized block = lcm(4, 8) = 8 tokens
    k, v = fill(rows, 0, 30)
    before = rows.bytes_held()
    rows.settle(0)
    assert rows.qlens[0] == [24, 24] and rows.fp_lengths(0) == [6, 6]  # 30 - 24 = 6 >= residual 5
    assert rows.num_blocks == 4 and rows.num_quant_blocks == 6  # 2 fp + 3 quantized blocks per row
    assert rows.pool.num_used_blocks == 4 and rows.qpool is not None and rows.qpool.num_used_blocks == 6
    assert rows.bytes_held() == 4 * rows.pool.bytes_per_block + 6 * rows.qpool.bytes_per_block < before
    assert sum(map(sum, rows.bytes_held_per_row())) == rows.bytes_held()
    view = rows.gather(0)
    assert torch.equal(view.pos, torch.arange(30).expand(2, 30))
    assert view.qslots is not None and bool((view.qslots[:, :24] >= 0).all()) and bool((view.qslots[:, 24:] < 0).all())
    kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D]
    assert torch.equal(view.k[:, 24:], kt[:, 24:]) and torch.equal(view.v[:, 24:], vt[:, 24:])  # residual exact
    err = max(float((view.k - kt).abs().max()), float((view.v - vt).abs().max()))
    assert 0 < err < 0.5, f"int8 max error {err:.3g}"
    rows.release()
    assert rows.pool.num_used_blocks == 0 and rows.qpool.num_used_blocks == 0


def test_scores_of_quantized_tokens_are_kept() -> None:
    rows = make_rows(Int4KV(group=4, residual=0))
    fill(rows, 1, 12)
    rows.settle(1)
    view = rows.gather(1)
    scores = torch.arange(24, dtype=torch.float32).view(2, 12)
    rows.write_scores(view, scores)
    assert torch.equal(rows.gather(1).score, scores)


def test_eviction_inside_the_quantized_prefix_is_lossless_until_a_block_is_wasted() -> None:
    rows = make_rows(Int4KV(group=8, residual=4))
    fill(rows, 0, 44)
    rows.settle(0)  # 40 quantized (5 blocks of 8) + 4 fp per row
    view = rows.gather(0)
    keep = [torch.tensor([i for i in range(44) if i not in (3, 9, 10, 30)]),  # 4 dead slots: no repack
            torch.tensor([i for i in range(44) if not 8 <= i < 16 and i != 42])]  # a whole block: freed
    rows.compact(0, view, keep)
    after = rows.gather(0)
    for h in range(2):
        n = len(keep[h])
        assert torch.equal(after.k[h, :n], view.k[h, keep[h]]) and torch.equal(after.v[h, :n], view.v[h, keep[h]])
        assert torch.equal(after.pos[h, :n], view.pos[h, keep[h]])
    assert [len(b) for b in rows.qblocks[0]] == [5, 4]
    # more dead slots in row 0 than one quantized block holds: its tail is dequantized, then re-quantized
    view = after
    keep0 = torch.tensor([i for i in range(40) if i % 5])  # drops 8 more quantized tokens
    rows.compact(0, view, [keep0, torch.arange(rows.lengths[0][1])])  # row 1 unchanged
    assert rows.qlens[0] == [0, 32] and rows.fp_lengths(0) == [32, 3]  # row 0 wholly dequantized
    rows.settle(0)
    final = rows.gather(0)
    assert torch.equal(final.pos[0, :32], view.pos[0, keep0])
    assert float((final.v[0, :32] - view.v[0, keep0]).abs().max()) < 1e-3  # values re-quantize to the same codes
    step = float((view.k[0].amax(0) - view.k[0].amin(0)).max()) / 15  # widest int4 key step of the row
    assert float((final.k[0, :32] - view.k[0, keep0]).abs().max()) <= step  # keys re-grouped: bounded, not exact
    assert sum(len(b) for b in rows.qblocks[0]) * 8 - sum(rows.qlens[0]) < 2 * 8  # < one wasted block per row
    rows.release()
    assert rows.pool.num_used_blocks == 0 and rows.qpool is not None and rows.qpool.num_used_blocks == 0
    rows.pool.check_invariants()
    rows.qpool.check_invariants()


def test_random_appends_compactions_and_settles_keep_positions_and_accounting() -> None:
    rows = make_rows(Int8KV(group=4, residual=3), num_layers=1, num_heads=3)
    gen = torch.Generator().manual_seed(0)
    model = [list(range(0)) for _ in range(3)]  # positions each row should hold
    nxt = 0
    for step in range(40):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        fill(rows, 0, n, start=nxt, seed=step)
        model = [m + list(range(nxt, nxt + n)) for m in model]
        nxt += n
        if step % 3 == 2:
            view = rows.gather(0)
            keep = []
            for h in range(3):
                mask = torch.rand(len(model[h]), generator=gen) < 0.7
                idx = torch.nonzero(mask).flatten()
                keep.append(idx)
                model[h] = [model[h][i] for i in idx.tolist()]
            rows.compact(0, view, keep)
        rows.settle(0)
        view = rows.gather(0)
        assert rows.lengths[0] == [len(m) for m in model]
        for h in range(3):
            assert view.pos[h, : len(model[h])].tolist() == model[h]
            assert rows.fp_lengths(0)[h] < 3 + 4
        assert torch.isfinite(view.k[view.valid]).all()
        expect = rows.num_blocks * rows.pool.bytes_per_block + rows.num_quant_blocks * rows.qpool.bytes_per_block
        assert rows.bytes_held() == expect
        rows.pool.check_invariants()
        rows.qpool.check_invariants()
    rows.release()
    assert rows.pool.num_used_blocks == 0 and rows.qpool.num_used_blocks == 0


def test_fp_and_quantized_pools_share_one_byte_budget() -> None:
    pool = BlockPool(16, block_size=4, num_blocks=4, max_blocks=32)
    rows = RowSet(pool, 1, 2, quant=Int8KV(group=4, residual=0))
    assert rows.qpool is not None
    cap = 32 * pool.bytes_per_block

    def reserved() -> int:
        return pool.num_blocks * pool.bytes_per_block + rows.qpool.num_blocks * rows.qpool.bytes_per_block

    with pytest.raises(OutOfBlocksError, match="exhausted"):
        for step in range(200):
            fill(rows, 0, 4, start=4 * step, seed=step)
            assert reserved() <= cap
            rows.settle(0)
            assert reserved() <= cap
    assert rows.num_quant_tokens() > 32 * 4  # quantized, more tokens fit than fp blocks alone would hold
    rows.release()
    pool.check_invariants()
    rows.qpool.check_invariants()
    assert pool.num_used_blocks == 0 and rows.qpool.num_used_blocks == 0


# ---- the engine ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    folder, _ = tiny_checkpoint("llama")  # tests.tiny.make_tiny("llama", ...), built once per session
    return LLM(folder, block_size=16)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return torch.randint(0, 256, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):  # noqa: ANN201
    yield
    if "llm" in request.fixturenames:
        pool: BlockPool = request.getfixturevalue("llm").pool
        pool.check_invariants()
        assert pool.num_used_blocks == 0, "fp blocks leaked"
        for qp in pool.quant_pools.values():
            qp.check_invariants()
            assert qp.num_used_blocks == 0, "quantized blocks leaked"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_quant_specs_parse_and_compose_with_retain_policies() -> None:
    long = KVSpec.parse("retain=snapkv(window=32) budget=uniform(tokens=1024) quant=int8")
    assert long == KVSpec.parse("snapkv:1024 int8")
    assert str(long.quant) == "int8(group=32,residual=64)"
    assert KVSpec.parse(str(long)) == long
    assert KVSpec.parse("int4").quant.name == "int4"
    assert KVSpec.parse("h2o:0.5 int4(group=16,residual=0)").quant.params == (("group", 16), ("residual", 0))
    with pytest.raises(ValueError, match="group"):
        KVSpec.parse("int8(group=0)")


def test_int8_logits_are_close_to_fp_and_int4_worse_but_finite(llm: LLM, prompt: list[int]) -> None:
    # Prefill in chunks of 8 so every later chunk reads the quantized cache of the earlier ones
    # (a dense prefill attends the whole prompt in full precision and only then quantizes).
    ref = llm.prompt_logits(prompt, "prefill=chunked(size=8)")
    err = {}
    for q in ("int8", "int4"):
        logits = llm.prompt_logits(prompt, f"prefill=chunked(size=8) {q}(group=32,residual=16)")
        assert torch.isfinite(logits).all()
        err[q] = float((logits - ref).abs().max())
    print(f"max |logit diff| vs fp over {PROMPT_LEN} positions (|logits| <= {float(ref.abs().max()):.2f}): "
          f"int8 {err['int8']:.4f}, int4 {err['int4']:.4f}")
    assert err["int8"] < 0.05, f"int8 max logit error {err['int8']:.4f}"
    assert err["int8"] < err["int4"] < 1.0, f"int8 {err['int8']:.4f}, int4 {err['int4']:.4f}"


def test_int4_holds_about_a_quarter_of_fp16_bytes_for_what_it_quantizes(llm: LLM, prompt: list[int]) -> None:
    full = llm.generate([prompt], greedy(8), kv="full")[0].stats
    out = {}
    for q in ("int8", "int4"):
        s = llm.generate([prompt], greedy(8), kv=f"{q}(group=32,residual=16)")[0].stats
        assert s.kv is not None and full.kv is not None
        assert s.kv.final_tokens_per_row == full.kv.final_tokens_per_row
        fp_part = s.kv_bytes_held - s.kv.final_quant_bytes  # the residual fp blocks, in the model dtype (fp32)
        # The fp part starts at a block boundary, so the full run holds the quantized tokens in exactly
        # kv_bytes_held - fp_part bytes of fp32; half of that is what fp16 would hold.
        fp16_same_tokens = (full.kv_bytes_held - fp_part) / 2
        assert s.kv.final_quant_tokens * 2 * llm.config.head_dim * 2 == fp16_same_tokens
        out[q] = (s.kv.final_quant_bytes / fp16_same_tokens, s.kv_bytes_held / full.kv_bytes_held)
    print(f"quantized-part bytes / fp16: int8 {out['int8'][0]:.4f}, int4 {out['int4'][0]:.4f}; "
          f"whole cache / fp32 (incl. residual fp blocks): int8 {out['int8'][1]:.3f}, int4 {out['int4'][1]:.3f}")
    assert 0.2 <= out["int4"][0] <= 0.35, f"int4 quantized part holds {out['int4'][0]:.3f} of fp16"
    assert 0.45 <= out["int8"][0] <= 0.65, f"int8 quantized part holds {out['int8'][0]:.3f} of fp16"
    assert out["int4"][1] < out["int8"][1] < 1.0


def test_quant_composes_with_snapkv_and_holds_fewer_bytes(llm: LLM, prompt: list[int]) -> None:
    plain = llm.generate([prompt], greedy(16), kv="snapkv:64")[0]
    quant = llm.generate([prompt], greedy(16), kv="snapkv:64 int8(residual=16)")[0]
    assert plain.stats.kv is not None and quant.stats.kv is not None
    assert quant.stats.kv.final_tokens_per_row == plain.stats.kv.final_tokens_per_row  # same budget kept
    assert quant.stats.kv.final_quant_tokens > 0
    assert len(quant.token_ids) == 16
    print(f"snapkv:64 holds {plain.stats.kv_bytes_held} B, snapkv:64 int8(residual=16) {quant.stats.kv_bytes_held} B")
    assert quant.stats.kv_bytes_held < plain.stats.kv_bytes_held
    assert quant.stats.kv_bytes_after_prefill < plain.stats.kv_bytes_after_prefill


def test_residual_covering_the_whole_run_equals_fp_exactly(llm: LLM, prompt: list[int]) -> None:
    n = 12
    ref = llm.generate([prompt], greedy(n), kv="full")[0]
    out = llm.generate([prompt], greedy(n), kv=f"int8(residual={PROMPT_LEN + n})")[0]
    assert out.token_ids == ref.token_ids
    assert out.stats.kv_bytes_held == ref.stats.kv_bytes_held and out.stats.kv is not None
    assert out.stats.kv.final_quant_tokens == 0
    chunked = "prefill=chunked(size=16)"
    assert torch.equal(llm.prompt_logits(prompt, f"{chunked} int4(residual={PROMPT_LEN})"),
                       llm.prompt_logits(prompt, chunked))


@pytest.mark.parametrize("codec", [Int8KV(group=16, residual=4), Int4KV(group=16, residual=4)])
def test_paged_decode_quant_twin_attends_to_what_the_rows_hold(codec: Int8KV | Int4KV) -> None:
    """The twin of the quantized decode kernel, fed the pool's quantized blocks (with dead slots after an
    eviction) and the fp suffix, equals dense attention over ``RowSet.gather`` (what the engine reads)."""
    from longctx.attention.triton.paged_decode_quant import QuantRows, paged_decode_quant_ref  # noqa: PLC0415

    rows = make_rows(codec, num_layers=1, num_heads=2, d=16, bs=16)  # quantized block = lcm(16, 16) = 16 tokens
    fill(rows, 0, 70)
    rows.settle(0)  # 64 quantized (4 blocks) + 6 fp per row
    view = rows.gather(0)
    keep = [torch.tensor([i for i in range(70) if i not in (2, 17, 18, 40, 66)]), torch.arange(70)]
    rows.compact(0, view, keep)  # row 0: dead quantized slots and a shorter fp suffix
    view = rows.gather(0)
    assert rows.qpool is not None and sum(rows.qlens[0]) > 0 and not bool(rows.qpool.alive.all())
    group, d = 3, 16
    q = torch.randn(1, 2 * group, d, generator=torch.Generator().manual_seed(5))
    scale = d**-0.5
    fp_lens = rows.fp_lengths(0)
    width = max(len(b) for b in rows.blocks[0])
    tables = torch.zeros(1, 2, max(width, 1), dtype=torch.int32)
    for h, blocks in enumerate(rows.blocks[0]):
        tables[0, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    qwidth = max(len(b) for b in rows.qblocks[0])
    qtables = torch.zeros(1, 2, qwidth, dtype=torch.int32)
    for h, blocks in enumerate(rows.qblocks[0]):
        qtables[0, h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    quant = QuantRows(rows.qpool.data, rows.qpool.alive, qtables,
                      torch.tensor([[len(b) for b in rows.qblocks[0]]], dtype=torch.int32), codec.bits, codec.group,
                      codec.value_group(d))
    out = paged_decode_quant_ref(q, rows.pool.k, rows.pool.v, tables, torch.tensor([fp_lens], dtype=torch.int32),
                                 scale, quant)
    for h in range(2):
        n = rows.lengths[0][h]
        k, v = view.k[h, :n], view.v[h, :n]
        ref = torch.softmax(q[0, h * group : (h + 1) * group] @ k.T * scale, dim=-1) @ v
        torch.testing.assert_close(out[0, h * group : (h + 1) * group], ref, rtol=1e-5, atol=1e-6)
