"""`longctx bench` harness on the tiny CPU shape: JSON schema, floors, baseline column, plot."""

from __future__ import annotations

import json
from pathlib import Path

from longctx.bench.sweep import decode_floor, run_bench


def test_bench_writes_points_with_floors_and_baseline(tmp_path: Path, torch_one_thread) -> None:  # noqa: ANN001
    points = run_bench(["tiny"], [48], [1], ["full", "snapkv:16"], device="cpu", dtype="fp32", new_tokens=3,
                       out=tmp_path)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["copy_bandwidth"] > 0
    engines = [(p["engine"], p["spec"]) for p in data["points"]]
    assert engines == [("transformers", "full"), ("longctx", "full"), ("longctx", "snapkv:16")]
    for p in data["points"]:
        assert p["tpot_s"] > 0 and p["ttft_s"] > 0 and p["floor_s"] > 0
        assert abs(p["ratio_to_floor"] - p["tpot_s"] / p["floor_s"]) < 1e-9
        assert p["ratio_to_baseline"] is not None
    full, snap = data["points"][1], data["points"][2]
    assert snap["kv_bytes_held"] < full["kv_bytes_held"]
    assert abs(full["ratio_to_baseline"] - full["tpot_s"] / data["points"][0]["tpot_s"]) < 1e-9
    assert (tmp_path / "tpot_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(points) == 3


def test_decode_floor_is_bytes_over_copy_bandwidth() -> None:
    assert decode_floor(weights=2_000, kv_bytes=1_000, bandwidth=1_000.0) == 3.0



def test_batched_tpot_times_steps_where_the_whole_batch_decodes(torch_one_thread, monkeypatch) -> None:  # noqa: ANN001
    import torch  # noqa: PLC0415

    from longctx.bench import sweep  # noqa: PLC0415
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.model.loader import LoadedModel  # noqa: PLC0415

    cfg = sweep.shape_config("tiny", 512)
    loaded = LoadedModel(sweep.random_model(cfg, "cpu", torch.float32), cfg, None, Path("<random tiny>"))
    llm = LLM(loaded, device="cpu", dtype=torch.float32, max_num_batched_tokens=64)
    eng = llm.engine
    seen: list[tuple[int, int]] = []  # per step: (requests decoding, requests still prefilling)
    real_step = eng.step

    def step():  # noqa: ANN202
        live = [r for r in eng.requests.values() if not r.is_finished]
        seen.append((sum(not r.is_prefill for r in live), sum(r.is_prefill for r in live)))
        return real_step()

    monkeypatch.setattr(eng, "step", step)
    prompts = [[1 + i] * 150 for i in range(3)]  # several chunks each at 64 tokens per step
    assert sweep.steady_decode_step(llm, prompts, "full", 4, "cpu") > 0
    prefill_steps = next(i for i, (_, p) in enumerate(seen) if p == 0)
    assert prefill_steps >= 6  # 450 prompt tokens at 64 per step
    assert seen[prefill_steps : prefill_steps + 6] == [(3, 0)] * 6  # 2 untimed + 4 timed, the whole batch decoding
    assert not eng.has_unfinished_requests() and llm.engine.kv.pool.num_used_blocks == 0


def test_batched_point_at_the_largest_context_has_room_to_decode(tmp_path: Path, torch_one_thread) -> None:  # noqa: ANN001
    """The model's context leaves room for the steady-state steps past the longest prompt."""
    points = run_bench(["tiny"], [200], [3], ["full"], device="cpu", dtype="fp32", new_tokens=3, out=tmp_path,
                       baseline=False)
    assert [p.batch for p in points] == [3] and points[0].tpot_s > 0
