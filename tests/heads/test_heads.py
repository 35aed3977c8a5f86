"""Head scores: the file round-trips and rejects corrupt files and other models' files; the copy-paste probe and
DuoAttention's calibration run on a tiny random model, are deterministic, and never change a weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longctx.cli import main
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.heads import binding
from longctx.heads.duo import DuoSettings, calibrate
from longctx.heads.resolve import cached_or_scored
from longctx.heads.retrieval import RetrievalSettings, score_retrieval
from longctx.heads.select import proportional_split, retrieval_mask
from longctx.heads.store import HeadScoresError, load_scores, parse_scores
from tests.heads.common import uniform_grid, write_scores

TINY_DUO = DuoSettings(steps=8, sinks=2, window=8, min_length=80, max_length=80, num_passkeys=2, passkey_digits=3,
                       seed=3)


def test_score_file_round_trips(llm: LLM, tmp_path: Path) -> None:
    grid = [[0.25 * (layer + h) for h in range(llm.config.num_kv_heads)] for layer in range(llm.config.num_layers)]
    path = write_scores(llm, tmp_path / "s.json", grid, extra={"sink_mass": uniform_grid(llm, 0.5)})
    back = load_scores(path, binding.model_sha256(llm), (llm.config.num_layers, llm.config.num_kv_heads))
    assert back.scores == grid and back.extra["sink_mass"] == uniform_grid(llm, 0.5)
    assert back.settings == {"probe": "test"} and back.method == "duo"
    assert parse_scores(back.to_json()) == back


@pytest.mark.parametrize("damage", ["truncate", "not_json", "edit", "version", "shape", "nan"])
def test_corrupt_score_files_are_rejected_with_one_line(llm: LLM, tmp_path: Path, damage: str) -> None:
    path = write_scores(llm, tmp_path / "s.json", uniform_grid(llm, 1.0))
    text = path.read_text()
    body = json.loads(text)
    if damage == "truncate":
        text = text[: len(text) // 2]
    elif damage == "not_json":
        text = "hello"
    elif damage == "edit":  # a changed score without a new checksum
        body["scores"][0][0] = 0.5
        text = json.dumps(body)
    elif damage == "version":
        body["version"] = 99
        text = json.dumps(body)
    elif damage == "shape":
        body["scores"] = body["scores"][:-1]
        text = json.dumps(body)
    else:
        text = text.replace("1.0", "NaN", 1)
    path.write_text(text)
    with pytest.raises(HeadScoresError, match="is corrupt") as err:
        load_scores(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_files_of_another_model_are_rejected(llm: LLM, tmp_path: Path) -> None:
    path = write_scores(llm, tmp_path / "other.json", uniform_grid(llm, 1.0), sha="f" * 64)
    with pytest.raises(HeadScoresError, match="belongs to another model"):
        load_scores(path, binding.model_sha256(llm))
    with pytest.raises(HeadScoresError, match="belongs to another model"):  # and through a KV spec
        llm.generate([1, 2, 3], SamplingParams(max_tokens=1), kv=f"budget=duo(heads={path},sinks=2,window=4)")
    with pytest.raises(HeadScoresError, match="3 layers x 2 kv-heads"):
        load_scores(path, shape=(4, 2))
    missing = tmp_path / "missing.json"
    with pytest.raises(HeadScoresError, match="does not exist"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=1), kv=f"budget=duo(heads={missing})")
    assert llm.pool.num_used_blocks == 0


def test_selection_helpers() -> None:
    assert retrieval_mask([[0.9, 0.1], [0.5, 0.7]], 0.5, 0.0) == [[True, False], [True, True]]
    assert retrieval_mask([[0.9, 0.1], [0.5, 0.7]], 0.0, 0.5) == [[True, False], [False, True]]
    assert proportional_split(40, [1.0, 3.0], 0) == [10, 30]
    assert sum(proportional_split(41, [1.0, 1.0, 1.0], 2)) == 41
    assert proportional_split(10, [0.0, 0.0], 1) == [5, 5]


def _weights(llm: LLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in llm.model.state_dict().items()}


def test_calibration_loss_decreases_and_never_changes_a_weight(llm: LLM) -> None:
    before = _weights(llm)
    flags = [p.requires_grad for p in llm.model.parameters()]
    result = calibrate(llm.model, llm.tokenizer, TINY_DUO)
    assert len(result.losses) == TINY_DUO.steps
    assert result.losses[-1] < result.losses[0]
    assert result.gates.shape == (llm.config.num_layers, llm.config.num_kv_heads)
    assert bool(((result.gates >= 0) & (result.gates <= 1)).all()) and float(result.gates.min()) < 1.0
    after = llm.model.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(t, after[name]), name
    assert all(p.grad is None for p in llm.model.parameters())
    assert [p.requires_grad for p in llm.model.parameters()] == flags


def test_calibration_is_deterministic_for_a_seed(llm: LLM) -> None:
    a, b = calibrate(llm.model, llm.tokenizer, TINY_DUO), calibrate(llm.model, llm.tokenizer, TINY_DUO)
    assert torch.equal(a.gates, b.gates) and a.losses == b.losses


def test_retrieval_probe_scores_and_sink_statistics(llm: LLM) -> None:
    settings = RetrievalSettings(samples=2, length=96, needle_words=3, require_correct=False, window=16)
    sha = binding.model_sha256(llm)
    a = score_retrieval(llm.model, llm.tokenizer, settings, sha, "tiny")
    b = score_retrieval(llm.model, llm.tokenizer, settings, sha, "tiny")
    assert a == b
    assert set(a.extra) == {"sink_mass", "local_mass", "induction", "echo"}
    for grid in (a.scores, *a.extra.values()):
        assert len(grid) == llm.config.num_layers and all(0.0 <= x <= 1.0 + 1e-6 for row in grid for x in row)
    assert any(x > 0 for row in a.scores for x in row)


def test_auto_scores_are_cached_beside_the_models(llm: LLM, tmp_path: Path) -> None:
    settings = RetrievalSettings(samples=1, length=64, needle_words=2, require_correct=False)
    first = cached_or_scored(llm, "retrieval", settings, progress=False)
    cached = list((tmp_path / "cache" / "heads").glob("*-retrieval-*.json"))
    assert len(cached) == 1 and binding.model_sha256(llm)[:12] in cached[0].name
    assert cached_or_scored(llm, "retrieval", settings, progress=False) == first


def test_cli_show_prints_a_table_and_writes_a_heatmap(llm: LLM, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write_scores(llm, tmp_path / "s.json", uniform_grid(llm, 0.5), extra={"sink_mass": uniform_grid(llm, 1)})
    assert main(["heads", "show", str(path), "--png", str(tmp_path / "map.png")]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "0.500" in out
    assert (tmp_path / "map.png").stat().st_size > 0
    assert main(["heads", "show", str(path), "--field", "sink_mass", "--png", str(tmp_path / "s.png")]) == 0
    (tmp_path / "bad.json").write_text("{")
    assert main(["heads", "show", str(tmp_path / "bad.json")]) == 2
    assert "is corrupt" in capsys.readouterr().err
