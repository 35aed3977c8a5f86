"""``longctx heads show FILE --attention PROMPT``: attention maps of chosen heads of the file's model, on the tiny
random Llama (3 layers, 4 query heads over 2 kv-heads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longctx.cli import main
from longctx.engine.llm import LLM
from longctx.errors import LongctxError
from longctx.heads.attention_maps import head_maps, parse_heads, pick_heads, plot_maps
from longctx.heads.store import load_scores
from tests.heads.common import write_scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _grid(llm: LLM) -> list[list[float]]:
    return [[0.1 * (2 * layer + h) for h in range(llm.config.num_kv_heads)] for layer in range(llm.config.num_layers)]


def test_head_maps_are_causal_distributions_averaged_over_the_group(llm: LLM) -> None:
    ids = llm.encode("the quick brown fox jumps over the lazy dog")
    heads = [(0, 1), (2, 0)]
    maps = head_maps(llm.model, ids, heads)
    assert list(maps) == heads
    n = len(ids)
    for p in maps.values():
        assert p.shape == (n, n) and p.dtype == torch.float32
        torch.testing.assert_close(p.sum(-1), torch.ones(n), atol=1e-5, rtol=0)  # over keys, per query
        assert torch.all(p.triu(1) == 0)  # causal: nothing above the diagonal
        assert torch.all(p >= 0)
    assert not torch.allclose(maps[(0, 1)], maps[(2, 0)])


def test_heads_syntax_and_default_pick() -> None:
    assert parse_heads("0:1, 2:0,0:1", 3, 2) == [(0, 1), (2, 0)]
    for bad in ("0-1", "a:b", "", "1:2:3", "-1:0"):
        with pytest.raises(LongctxError, match=r"not LAYER:KV_HEAD .*layers 0-2, kv-heads 0-1") as err:
            parse_heads(bad, 3, 2)
        assert "\n" not in str(err.value)
    for bad in ("3:0", "0:2"):
        with pytest.raises(LongctxError, match=r"out of range; this model has layers 0-2, kv-heads 0-1"):
            parse_heads(bad, 3, 2)
    grid = [[0.5, 0.9], [0.1, 0.7], [0.3, 0.2], [0.8, 0.0]]
    assert pick_heads(grid) == [(0, 1), (3, 0), (1, 1), (2, 1), (1, 0), (3, 1)]
    assert pick_heads([[1.0, 2.0]]) == [(0, 1), (0, 0)]  # fewer heads than 2 x 3: each once


def test_plot_maps_writes_a_png(llm: LLM, tmp_path: Path) -> None:
    scores = load_scores(write_scores(llm, tmp_path / "s.json", _grid(llm)))
    maps = head_maps(llm.model, llm.encode("hello attention maps"), [(1, 0), (0, 1), (2, 1), (0, 0)])
    png = plot_maps(maps, scores, tmp_path / "out" / "maps.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_show_attention(llm: LLM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_scores(llm, tmp_path / "s.json", _grid(llm))
    out = tmp_path / "att.png"
    assert main(["heads", "show", str(path), "--png", str(tmp_path / "h.png"), "--model", str(llm.source),
                 "--attention", "a prompt for the maps", "--heads", "0:0,2:1", "--attention-png", str(out)]) == 0
    assert f"attention maps: {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_MAGIC
    # the prompt from a file, capped, default heads (top 3 + bottom 3), default path beside the file
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("x" * 100)
    assert main(["heads", "show", str(path), "--model", str(llm.source), "--attention", str(prompt),
                 "--max-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert "the attention maps use its first 16 (--max-tokens)" in captured.err
    assert (tmp_path / "s.attention.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_show_attention_finds_the_files_model(llm: LLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write_scores(llm, tmp_path / "s.json", _grid(llm))  # model_name "tiny": a folder in the cwd
    (tmp_path / "tiny").symlink_to(llm.source, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert main(["heads", "show", str(path), "--attention", "hi", "--heads", "1:1"]) == 0
    assert "attention maps:" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--attention", "hi", "--heads", "0;1"], "--heads: '0;1' is not LAYER:KV_HEAD"),
    (["--attention", "hi", "--heads", "0:1,9:0"],
     "--heads: 9:0 is out of range; this model has layers 0-2, kv-heads 0-1"),
    (["--heads", "0:1"], "--heads, --model: only with --attention PROMPT"),
    (["--attention", "hi", "--max-tokens", "0"], "--max-tokens: must be a positive number"),
    (["--attention", "  "], "--attention: the prompt is empty"),
])
def test_cli_show_attention_errors(llm: LLM, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                   message: str) -> None:
    path = write_scores(llm, tmp_path / "s.json", _grid(llm))
    assert main(["heads", "show", str(path), "--model", str(llm.source), *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1
    assert captured.out == ""  # refused before the table, the heatmap and the model


def test_cli_show_attention_refuses_another_model(llm: LLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write_scores(llm, tmp_path / "s.json", _grid(llm), sha="f" * 64)

    def no_load(*_args: object, **_kw: object) -> None:
        raise AssertionError("the model must be refused before it loads")

    monkeypatch.setattr("longctx.engine.llm.LLM", no_load)
    assert main(["heads", "show", str(path), "--model", str(llm.source), "--attention", "hi",
                 "--attention-png", str(tmp_path / "att.png")]) == 2
    err = capsys.readouterr().err
    assert "was scored for tiny (sha256 ffffffffffff), not for" in err and str(llm.source) in err
    assert err.count("\n") == 1
    assert not (tmp_path / "att.png").exists()
