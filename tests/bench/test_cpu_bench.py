"""The benchmarks run end to end on a tiny random llama checkpoint and emit the documented JSON schema."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from longctx.bench import cpu_generation, needle_table

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT_TOKENS = 24
NEW_TOKENS = 4
SNAPKV = 8
RESULT_KEYS = {
    "name", "engine", "kv", "prompt_tokens", "new_tokens", "load_s", "load_rss_delta_mib", "prefill_s",
    "prefill_tok_s", "decode_tok_s", "e2e_tok_s", "total_s", "run_peak_extra_mib", "kv_bytes_held",
    "tokens_matching_baseline", "best_prefill_s", "best_decode_tok_s", "best_e2e_tok_s", "range_prefill_s",
    "range_decode_tok_s", "range_e2e_tok_s", "runs",
}


@pytest.fixture(scope="module")
def tiny_llama(tiny_checkpoint: Callable[[str], tuple[Path, Any]]) -> Path:
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def short_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Short sentences, so that a byte-level tokenizer fits a haystack in the tiny model's 256 positions."""
    rng = random.Random(0)
    words = "the cat sat on a mat by the door and we saw it run far away".split()
    text = " ".join(" ".join(rng.choice(words) for _ in range(5)).capitalize() + "." for _ in range(100))
    path = tmp_path_factory.mktemp("bench") / "haystack.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def generation_result(tiny_llama: Path, short_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench_json") / "gen.json"
    rc = cpu_generation.main([
        "--model", str(tiny_llama), "--prompt-tokens", str(PROMPT_TOKENS), "--new-tokens", str(NEW_TOKENS),
        "--repeats", "2", "--snapkv-tokens", str(SNAPKV), "--threads", "1", "--text", str(short_text),
        "--json", str(out),
    ])
    assert rc == 0
    return json.loads(out.read_text())


def test_generation_schema(generation_result: dict) -> None:
    r = generation_result
    assert r["schema"] == cpu_generation.SCHEMA
    assert {"schema", "date", "machine", "config", "results", "ratios", "ratios_best", "wall_s"} <= set(r)
    assert {"cpu", "cpu_count", "torch_threads", "loadavg_before", "loadavg_after"} <= set(r["machine"])
    assert r["machine"]["torch_threads"] == 1
    cfg = r["config"]
    assert (cfg["prompt_tokens"], cfg["new_tokens"], cfg["repeats"]) == (PROMPT_TOKENS, NEW_TOKENS, 2)
    names = [x["name"] for x in r["results"]]
    assert names == ["transformers", "longctx", f"longctx snapkv:{SNAPKV}"]
    assert set(r["ratios"]) == set(names[1:])


def test_generation_numbers(generation_result: dict) -> None:
    for res in generation_result["results"]:
        assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
        assert res["prompt_tokens"] == PROMPT_TOKENS and res["new_tokens"] == NEW_TOKENS
        for key in ("load_s", "prefill_s", "prefill_tok_s", "decode_tok_s", "e2e_tok_s", "total_s"):
            assert res[key] > 0, key
        assert res["prefill_s"] < res["total_s"] * 1.5  # prefill is part of the call (medians, so allow slack)
        assert len(res["runs"]) == 2
        for run in res["runs"]:
            assert run["prefill_s"] > 0 and run["decode_s"] > 0 and run["total_s"] > 0
            assert run["generated_tokens"] == NEW_TOKENS
        assert 0 <= res["tokens_matching_baseline"] <= NEW_TOKENS
        if res["engine"] == "longctx":
            assert res["kv_bytes_held"] > 0
    full, snap = generation_result["results"][1:]
    assert snap["kv_bytes_held"] < full["kv_bytes_held"]  # snapkv:8 holds fewer tokens than the 28-token cache


def test_generation_ratios_are_computed_from_the_measurements(generation_result: dict) -> None:
    results = {x["name"]: x for x in generation_result["results"]}
    base = results["transformers"]
    for name, ratios in generation_result["ratios"].items():
        assert set(ratios) == set(cpu_generation.RATIO_METRICS)
        for metric, value in ratios.items():
            assert value == pytest.approx(results[name][metric] / base[metric])
        for metric, value in generation_result["ratios_best"][name].items():
            assert value == pytest.approx(results[name][metric] / base[metric])
        res = results[name]
        assert res["range_decode_tok_s"][0] <= res["decode_tok_s"] <= res["range_decode_tok_s"][1]
        assert res["best_prefill_s"] == min(run["prefill_s"] for run in res["runs"])
    table = cpu_generation.format_table(generation_result)
    assert "| **longctx / transformers** (median; best-of) |" in table
    assert f"{generation_result['ratios']['longctx']['decode_tok_s']:.2f}x" in table


def test_generation_rejects_one_new_token(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="new_tokens"):
        cpu_generation.run_benchmark(tiny_llama, prompt_tokens=8, new_tokens=1, threads=1)


def test_needle_table(tiny_llama: Path, short_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "needle.json"
    rc = needle_table.main([
        "--model", str(tiny_llama), "--tokens", "80", "--depths", "0.5", "--budgets", "16,32",
        "--methods", "full,snapkv,h2o,snapkv+int8", "--haystack", str(short_text), "--threads", "1",
        "--json", str(out),
    ])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["schema"] == needle_table.SCHEMA
    assert len(r["cells"]) == 1 + 3 * 2  # full once, the others at each budget
    full = next(c for c in r["cells"] if c["method"] == "full")
    for cell in r["cells"]:
        assert cell["kv_bytes_held"] > 0 and isinstance(cell["correct"], bool)
        if cell["method"] != "full":
            assert cell["kv_bytes_held"] < full["kv_bytes_held"]
    rows = {(row["method"], row["budget"]): row for row in r["rows"]}
    assert rows[("full", None)]["vs_full"] == pytest.approx(1.0)
    snap16 = next(c for c in r["cells"] if c["spec"] == "snapkv:16")
    assert rows[("snapkv", 16)]["vs_full"] == pytest.approx(snap16["kv_bytes_held"] / full["kv_bytes_held"])
    assert "`retain=snapkv budget=pyramid" not in needle_table.format_table(r)
    assert "| snapkv+int8 | 32 | `snapkv:32 int8` |" in needle_table.format_table(r)


def test_needle_plan_covers_the_methods() -> None:
    specs = [spec for _, _, spec in needle_table.plan(list(needle_table.DEFAULT_METHODS), [256, 1024])]
    assert len(specs) == 1 + 11 * 2
    assert "retain=snapkv budget=pyramid(tokens=1024)" in specs and "snapkv:256 int4" in specs
    with pytest.raises(ValueError, match="unknown methods"):
        needle_table.plan(["nope"], [256])
