"""Synthetic head-score files (``longctx heads synth``, ``longctx.heads.synthetic``): deterministic per seed, the
fraction respected, bound to the model's hash (checkpoints and the bench's random weights) and driving duo so that
fraction 1 is the full cache and fraction 0 is StreamingLLM with the same sinks and window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longctx.bench.sweep import random_model, shape_config
from longctx.cli import main
from longctx.engine.llm import LLM
from longctx.heads import binding
from longctx.heads.select import retrieval_mask
from longctx.heads.store import HeadScoresError, load_scores
from longctx.heads.synthetic import synthetic_scores, uses_synthetic, with_heads_file, write_for_llm
from longctx.model.loader import LoadedModel
from tests.kv.test_budget_heads import GREEDY, PROMPT, SINKS, WINDOW


def _rows(scores) -> set[tuple[int, int]]:  # noqa: ANN001
    return {(layer, h) for layer, row in enumerate(scores.extra["synthetic_retrieval"]) for h, m in enumerate(row) if m}


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_fraction_is_respected_and_marked_synthetic(fraction: float) -> None:
    s = synthetic_scores(32, 8, 32, fraction, seed=1, model_sha256="a" * 64, model_name="m")
    assert len(_rows(s)) == round(fraction * 256) == s.settings["retrieval_rows"]
    assert s.settings["synthetic"] is True and s.settings["fraction"] == fraction and s.settings["seed"] == 1
    mask = retrieval_mask(s.scores, 0.5, 0.0)  # duo's default threshold keeps exactly the marked rows
    assert {(layer, h) for layer, row in enumerate(mask) for h, m in enumerate(row) if m} == _rows(s)
    assert all(x >= 0.75 if m else x < 0.25 for row, mrow in zip(s.scores, s.extra["synthetic_retrieval"], strict=True)
               for x, m in zip(row, mrow, strict=True))


def test_same_seed_same_file_other_seed_other_heads() -> None:
    a, b = (synthetic_scores(32, 8, 32, 0.5, seed=7, model_sha256="a" * 64, model_name="m") for _ in range(2))
    assert a.to_json() == b.to_json()
    assert _rows(synthetic_scores(32, 8, 32, 0.5, seed=8, model_sha256="a" * 64, model_name="m")) != _rows(a)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        synthetic_scores(2, 2, 4, 1.5, seed=0, model_sha256="a" * 64, model_name="m")


def test_fraction_one_is_full_and_zero_is_streamingllm(llm: LLM, tmp_path: Path) -> None:
    every, none = (write_for_llm(llm, tmp_path / f"{f}.json", f, seed=3) for f in (1.0, 0.0))
    full = llm.generate(PROMPT, GREEDY, kv="full")[0]
    for spec in (f"budget=duo(heads={every},sinks={SINKS},window={WINDOW})",
                 f"budget=razor(heads={every},sinks={SINKS},window={WINDOW},threshold=0.5)"):
        out = llm.generate(PROMPT, GREEDY, kv=spec)[0]
        assert out.token_ids == full.token_ids and out.stats.kv.num_evictions == 0, spec
        assert out.stats.kv.final_bytes == full.stats.kv.final_bytes, spec
    duo = llm.generate(PROMPT, GREEDY, kv=f"budget=duo(heads={none},sinks={SINKS},window={WINDOW})")[0]
    ref = llm.generate(PROMPT, GREEDY, kv=f"retain=streamingllm(num_sinks={SINKS}) "
                                          f"budget=uniform(tokens={SINKS + WINDOW})")[0]
    assert duo.token_ids == ref.token_ids
    assert duo.stats.kv.final_tokens_per_row == ref.stats.kv.final_tokens_per_row
    assert duo.stats.kv.final_bytes == ref.stats.kv.final_bytes
    assert llm.pool.num_used_blocks == 0


def test_half_the_heads_hold_everything_the_rest_sinks_and_window(llm: LLM, tmp_path: Path) -> None:
    path = write_for_llm(llm, tmp_path / "half.json", 0.5, seed=0)
    scores = load_scores(path, binding.model_sha256(llm), (llm.config.num_layers, llm.config.num_kv_heads))
    assert scores.settings["model_hash"] == "checkpoint"
    chosen = _rows(scores)
    assert len(chosen) == round(0.5 * llm.config.num_layers * llm.config.num_kv_heads)
    out = llm.generate(PROMPT, GREEDY, kv=f"budget=duo(heads={path},sinks={SINKS},window={WINDOW})")[0]
    total = len(PROMPT) + GREEDY.max_tokens - 1
    for layer, row in enumerate(out.stats.kv.final_tokens_per_row):
        assert row == [total if (layer, h) in chosen else SINKS + WINDOW for h in range(len(row))]
    spec = f"retain=snapkv budget=headkv(heads={path},tokens=20,beta=2.0,scope=global)"
    rows = llm.generate(PROMPT, GREEDY, kv=spec)[0].stats.kv.final_tokens_per_row  # retrieval rows: most of the pool
    kept = {(layer, h): n for layer, row in enumerate(rows) for h, n in enumerate(row)}
    assert min(n for k, n in kept.items() if k in chosen) > max(n for k, n in kept.items() if k not in chosen)


def test_cli_synth_for_a_checkpoint_binds_to_its_files(llm: LLM, tiny_checkpoint, tmp_path: Path,  # noqa: ANN001
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = tiny_checkpoint("llama")
    out = tmp_path / "h.json"
    assert main(["heads", "synth", "--model", str(folder), "--retrieval-fraction", "0.5", "--seed", "2",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    scores = load_scores(out, binding.model_sha256(llm))
    assert scores.settings["synthetic"] is True and scores.settings["seed"] == 2
    assert main(["heads", "show", str(out)]) == 0
    assert "synthetic=True" in capsys.readouterr().out
    other = tiny_checkpoint("qwen2")[0]
    assert main(["heads", "synth", "--model", str(other), "--retrieval-fraction", "0.5", "--out",
                 str(tmp_path / "q.json")]) == 0
    with pytest.raises(HeadScoresError, match="belongs to another model"):
        llm.generate(PROMPT, GREEDY, kv=f"budget=duo(heads={tmp_path / 'q.json'},sinks=2,window=4)")


def _bench_llm(seed: int = 0) -> LLM:
    """An LLM over random weights built as ``longctx bench`` builds it."""
    cfg = shape_config("tiny", 4096)
    return LLM(LoadedModel(random_model(cfg, "cpu", torch.float32, seed=seed), cfg, None, Path("<random tiny>")))


def test_random_models_hash_their_recipe_not_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(binding, "weights_sha256", lambda model: pytest.fail("hashed every byte"))
    cfg = shape_config("tiny", 64)
    raw = binding.recipe_sha256(random_model(cfg, "cpu", torch.float32))  # before LLM fuses q/k/v
    llm = _bench_llm()
    assert binding.model_sha256(llm) == raw and binding.hash_kind(llm) == "random-recipe"
    assert binding.model_sha256(_bench_llm(seed=1)) != raw
    out = tmp_path / "h.json"
    assert main(["heads", "synth", "--shape", "tiny", "--device", "cpu", "--dtype", "fp32",
                 "--retrieval-fraction", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    spec = f"budget=duo(heads={out},sinks=2,window=4)"
    prompt = list(range(1, 30))
    assert len(llm.generate(prompt, GREEDY, kv=spec)[0].token_ids) == GREEDY.max_tokens
    with pytest.raises(HeadScoresError, match="belongs to another model"):
        _bench_llm(seed=1).generate(prompt, GREEDY, kv=spec)


def test_spec_substitution() -> None:
    assert uses_synthetic("budget=duo(heads=synthetic)") and not uses_synthetic("full")
    assert not uses_synthetic("budget=duo(heads=/x.json)")
    spec = with_heads_file("budget=razor(heads=synthetic,threshold=0.5) prefill=chunked(size=64)", "/tmp/h.json")
    assert "heads=/tmp/h.json" in spec and "threshold=0.5" in spec and "chunked" in spec
    assert with_heads_file("snapkv:64", "/tmp/h.json") == "snapkv:64"
    with pytest.raises(Exception, match="spaces, commas"):
        with_heads_file("budget=duo(heads=synthetic)", "/tmp/a b.json")


def test_bench_measures_duo_on_synthetic_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    duo = f"budget=duo(heads=synthetic,sinks={SINKS},window={WINDOW})"
    assert main(["bench", "--shapes", "tiny", "--device", "cpu", "--dtype", "fp32", "--contexts", "48",
                 "--new-tokens", "3", "--no-baseline", "--kv", f"full; {duo}", "--synthetic-heads", "0.5",
                 "--out", str(out)]) == 0
    assert "synthetic head scores (not measured" in capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    full, point = data["points"]
    assert point["spec"] == duo and data["synthetic_heads"]["fraction"] == 0.5
    scores = load_scores(data["synthetic_heads"]["files"]["tiny"])
    assert scores.settings["model_hash"] == "random-recipe"
    rows = len(_rows(scores))
    cfg = shape_config("tiny", 64)
    block = 2 * 16 * cfg.head_dim * 4  # fp32 K+V of one 16-token block
    n = 48 + 3 - 1  # tokens stored at the end (the last sampled token is never cached)
    per_row = -(-n // 16) * block
    streaming = -(-(SINKS + WINDOW) // 16) * block
    assert full["kv_bytes_per_seq"] == full["kv_bytes_held"] == cfg.num_layers * cfg.num_kv_heads * per_row
    assert point["kv_bytes_per_seq"] == rows * per_row + (cfg.num_layers * cfg.num_kv_heads - rows) * streaming


def test_bench_needs_synthetic_heads_with_heads_synthetic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "tiny", "--device", "cpu", "--kv", "budget=duo(heads=synthetic)"]) == 2
    assert "--synthetic-heads" in capsys.readouterr().err
    assert main(["bench", "--shapes", "tiny", "--device", "cpu", "--kv", "full", "--synthetic-heads", "0.5"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--synthetic-heads", "2"])
