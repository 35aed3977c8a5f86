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
