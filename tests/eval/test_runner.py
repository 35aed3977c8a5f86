"""The evaluation grid: length/spec/task parsing, resume, batching, provenance and recorded errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from longctx.engine.llm import LLM
from longctx.errors import LongctxError, SpecError
from longctx.eval import provenance
from longctx.eval.haystack import cut_haystack
from longctx.eval.runner import RESULTS_NAME, parse_lengths, parse_specs, read_results, resolve_tasks, run_grid
from longctx.eval.tasks.base import Question, Sample

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class TwoQuestionTask:
    """A fake task: a haystack context with a code word, asked two questions (they share the context)."""

    name: ClassVar[str] = "fake2q"
    max_new_tokens: ClassVar[int] = 3

    def samples(self, tokenizer: Any, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        out = []
        for i in range(num_samples):
            cut = cut_haystack(tokenizer, haystack, length, seed=f"{seed}-{i}")
            qs = tuple(Question(f"\n\nQuestion {j}: the code word?", ("zz",), {"depth": d})
                       for j, d in enumerate((0.0, 1.0)))
            out.append(Sample(self.name, f"fake2q-{length}-{i}-s{seed}", cut.text, qs, length))
        return out

    def score(self, output: str, question: Question) -> float:
        return float(all(a in output for a in question.answers))


def long_context_copy(folder: Path, dest: Path, max_positions: int = 1024) -> Path:
    """The tiny checkpoint with a longer declared context (RoPE is native, so nothing else changes): the byte
    tokenizer makes RULER prompts longer than the tiny model's 256 positions."""
    if not (dest / "config.json").exists():
        shutil.copytree(folder, dest)
        cfg = json.loads((dest / "config.json").read_text())
        cfg["max_position_embeddings"] = max_positions
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Callable[[str], tuple[Path, Any]]) -> Path:
    return tiny_checkpoint("llama")[0]


class CountingLLM(LLM):
    calls: ClassVar[list[int]] = []  # prompts per generate call

    def generate(self, prompts, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        type(self).calls.append(len(prompts))
        return super().generate(prompts, *args, **kwargs)


def test_parse_lengths_accepts_k_suffix_and_ints() -> None:
    assert parse_lengths("2k,4k,8k") == [2048, 4096, 8192]
    assert parse_lengths("128, 200") == [128, 200]
    assert parse_lengths([512, "1k"]) == [512, 1024]
    assert parse_lengths("1.5k") == [1536]
    for bad in ("", "2x", "0", "1.3"):
        with pytest.raises(LongctxError):
            parse_lengths(bad)


def test_parse_specs_canonical_and_errors() -> None:
    assert parse_specs("full; snapkv:512 ;") == ["retain=full", str(parse_specs("snapkv:512")[0])]
    assert parse_specs("full; retain=full") == ["retain=full"]  # duplicates collapse
    with pytest.raises(SpecError, match="nosuch"):
        parse_specs("full; nosuch:5")
    with pytest.raises(LongctxError):
        parse_specs(" ; ")


def test_resolve_tasks_expands_groups_and_names_unknown() -> None:
    names = [t.name for t in resolve_tasks("needle,ruler,ppl")]
    assert names[0] == "needle" and names[-1] == "ppl" and len(names) == 8
    with pytest.raises(LongctxError, match="unknown task 'nope'.*ppl"):
        resolve_tasks("needle,nope")


def test_resume_skips_finished_work(tiny: Path, tmp_path: Path) -> None:
    CountingLLM.calls.clear()
    kwargs = dict(samples=2, seed=3, out_dir=tmp_path, progress=False, llm_factory=CountingLLM)
    s1 = run_grid([tiny], "full; streamingllm:32", [TwoQuestionTask()], "64,96", **kwargs)
    lines = (tmp_path / RESULTS_NAME).read_text().splitlines()
    assert s1.written == len(lines) == 2 * 2 * 2 * 2  # specs x lengths x samples x questions
    # Batched: one generate call per (length, spec) with every question of every sample in it.
    assert CountingLLM.calls == [4, 4, 4, 4]
    CountingLLM.calls.clear()
    s2 = run_grid([tiny], "full; streamingllm:32", [TwoQuestionTask()], "64,96", **kwargs)
    assert CountingLLM.calls == [] and s2.written == 0 and s2.skipped == 16
    assert (tmp_path / RESULTS_NAME).read_text().splitlines() == lines
    # Lose the last three lines (a crash): only those are redone, in one call.
    (tmp_path / RESULTS_NAME).write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])  # plus a torn line
    s3 = run_grid([tiny], "full; streamingllm:32", [TwoQuestionTask()], "64,96", **kwargs)
    assert CountingLLM.calls == [3] and s3.written == 3
    rows = read_results(tmp_path / RESULTS_NAME)
    assert sorted(r["key"] for r in rows) == sorted(json.loads(x)["key"] for x in lines)
    assert {r["key"]: r["output_ids"] for r in rows} == {json.loads(x)["key"]: json.loads(x)["output_ids"]
                                                          for x in lines}  # greedy: the same answers again


def test_result_lines_and_provenance_fields(tiny: Path, tmp_path: Path) -> None:
    run_grid([tiny], "full; snapkv:32", [TwoQuestionTask()], [80], samples=1, seed=5, out_dir=tmp_path,
             progress=False)
    rows = read_results(tmp_path / RESULTS_NAME)
    assert len(rows) == 4
    for r in rows:
        for k in ("key", "score", "output", "output_ids", "expected", "meta", "kv_bytes_held", "kv_bytes_after_prefill",
                  "kv_bytes_peak", "kv_bytes_full", "prompt_tokens", "time_to_first_token", "time_per_output_token",
                  "prompt_sha256"):
            assert k in r, k
        assert r["expected"] == ["zz"] and "depth" in r["meta"] and r["error"] is None
        p = r["provenance"]
        for k in ("longctx_version", "git_commit", "git_dirty", "model", "tokenizer", "chat_template_used",
                  "chat_template_sha256", "stop_ids", "max_new_tokens", "truncation", "spec", "seed", "device", "dtype",
                  "torch_version", "timestamp", "haystack_sha256"):
            assert k in p, k
        assert p["spec"] == r["spec"] and p["seed"] == 5 and p["max_new_tokens"] == 3 and p["chat_template_used"]
        assert p["tokenizer"]["vocab_size"] > 256 and len(p["tokenizer"]["sha256"]) == 64
        assert p["model"]["files"]["model.safetensors"] == provenance.sha256_file(tiny / "model.safetensors")
    snap = [r for r in rows if r["spec"] != "retain=full"]
    assert all(r["kv_bytes_held"] < r["kv_bytes_full"] for r in snap)
    # Stored prompt ids rebuild exactly what ran.
    prompts = {p["sha256"]: p["ids"] for p in read_results(tmp_path / "prompts.jsonl")}
    assert all(len(prompts[r["prompt_sha256"]]) == r["prompt_tokens"] for r in rows)


def test_model_hash_is_cached(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hash_cache.json"
    first = provenance.model_fingerprint(tiny, cache)
    assert cache.exists()

    def boom(*a: Any, **k: Any) -> str:
        raise AssertionError("re-hashed a file whose size and mtime did not change")

    monkeypatch.setattr(provenance, "sha256_file", boom)
    assert provenance.model_fingerprint(tiny, cache) == first


def test_unbuildable_length_is_recorded_and_grid_goes_on(tiny: Path, tmp_path: Path) -> None:
    s = run_grid([tiny], "full", ["niah_multikey", TwoQuestionTask()], [64], samples=1, out_dir=tmp_path,
                 progress=False)
    rows = read_results(tmp_path / RESULTS_NAME)
    errs = [r for r in rows if r.get("error")]
    assert s.errors == len(errs) == 1 and "too short" in errs[0]["error"]
    assert sum(1 for r in rows if r["task"] == "fake2q" and not r.get("error")) == 2
    s2 = run_grid([tiny], "full", ["niah_multikey", TwoQuestionTask()], [64], samples=1, out_dir=tmp_path,
                  progress=False)
    assert s2.written == 0


def test_prompt_too_long_becomes_error_lines(tiny: Path, tmp_path: Path) -> None:
    s = run_grid([tiny], "full", [TwoQuestionTask()], [256], samples=1, out_dir=tmp_path, progress=False)
    rows = read_results(tmp_path / RESULTS_NAME)
    assert s.errors == 2 and all("PromptTooLongError" in r["error"] for r in rows)


def test_cli_eval_errors_are_one_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from longctx.cli import main

    base = ["eval", "run", "--model", str(tiny), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main([*base, "--kv", "full; bogus:3"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main([*base, "--lengths", "2q"]) == 2
    assert main(["eval", "report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["eval", "run", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o")]) == 2
