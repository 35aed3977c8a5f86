"""Report: intervals, spec labels, the baseline check, and a tiny-model grid end to end (every plot, the HTML page,
the transformers oracle, the CLI)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from longctx.errors import LongctxError
from longctx.eval.labels import label_specs, spec_label
from longctx.eval.report import Cell, aggregate, baseline_flags, load_results, make_report
from longctx.eval.runner import run_grid
from longctx.eval.stats import Summary, summarize, t_interval, wilson
from longctx.eval.tasks.needle import NeedleTask
from tests.eval.test_runner import long_context_copy

pytestmark = pytest.mark.usefixtures("torch_one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


def test_wilson_known_values() -> None:
    lo, hi = wilson(5, 10)
    assert math.isclose(lo, 0.236593, abs_tol=1e-5) and math.isclose(hi, 0.763407, abs_tol=1e-5)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.277533, abs_tol=1e-5)
    lo, hi = wilson(10, 10)
    assert math.isclose(lo, 0.722467, abs_tol=1e-5) and hi == 1.0
    lo, hi = wilson(81, 263)  # Wilson (1927)-style textbook case: 0.3080 [0.2553, 0.3662]
    assert math.isclose(lo, 0.2553, abs_tol=1e-4) and math.isclose(hi, 0.3662, abs_tol=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_t_interval_and_summary_choice() -> None:
    lo, hi = t_interval([1.0, 2.0, 3.0], bounds=None)
    assert math.isclose(hi - 2.0, 4.302653 / math.sqrt(3), rel_tol=1e-6) and math.isclose(lo + hi, 4.0)
    assert summarize([1, 0, 1, 1]).method == "wilson"
    s = summarize([0.5, 0.25, 1.0])
    assert s.method == "t" and 0.0 <= s.lo <= s.mean <= s.hi <= 1.0
    assert summarize([]).n == 0


def _cell(mean: float, lo: float, hi: float, n: int = 20) -> Cell:
    return Cell(Summary(mean, lo, hi, n, "wilson"), n, 0, None, None, None, None, None, None)


def test_baseline_check_flags_only_beyond_noise() -> None:
    specs = ["retain=full", str(spec_label("snapkv:64").spec), str(spec_label("h2o:64").spec)]
    labels = label_specs(specs)
    cells = {("m", "needle", specs[0], 100): _cell(0.30, 0.15, 0.50),
             ("m", "needle", specs[1], 100): _cell(0.90, 0.70, 0.97),  # far above full: flagged
             ("m", "needle", specs[2], 100): _cell(0.35, 0.18, 0.55)}  # within noise: not flagged
    flags = baseline_flags(cells, labels)
    assert [f.spec for f in flags] == [specs[1]] and "beats full" in flags[0].message
    # Perplexity: lower is better.
    ppl = {("m", "ppl", specs[0], 100): _cell(20.0, 19.0, 21.0), ("m", "ppl", specs[1], 100): _cell(12.0, 11.0, 13.0),
           ("m", "ppl", specs[2], 100): _cell(25.0, 24.0, 26.0)}
    for c in ppl.values():
        c.kind = "ppl"
    flags = baseline_flags(ppl, labels)
    assert [(f.spec, f.metric) for f in flags] == [(specs[1], "perplexity")]


@pytest.fixture(scope="module")
def grid(tiny_checkpoint: Callable[[str], tuple[Path, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = long_context_copy(tiny_checkpoint("llama")[0], tmp_path_factory.mktemp("tiny_long") / "m")
    out = tmp_path_factory.mktemp("grid")
    specs = "full; streamingllm:32"
    run_grid([model], specs, [NeedleTask(depths=(0.0, 0.5, 1.0)), "ppl"], "128,200", samples=2, out_dir=out,
             progress=False)
    # RULER prompts take ~450 byte-tokens of fixed text: their own lengths, appended to the same folder.
    run_grid([model], specs, ["niah_multikey"], "512,600", samples=2, out_dir=out, progress=False)
    return out


def test_grid_report_writes_every_plot_and_one_html(grid: Path) -> None:
    rows = load_results(grid)
    assert {r["task"] for r in rows} == {"needle", "niah_multikey", "ppl"} and not any(r.get("error") for r in rows)
    assert len(rows) == 2 * 2 * (3 * 2 + 2 + 2)  # specs x lengths x (needle depths x samples + ppl + multikey)
    rep = make_report(grid)
    names = {p.name for p in rep.files}
    expected = {"needle_heatmap_needle.png", "accuracy_vs_budget_needle.png", "accuracy_vs_kv_needle.png",
                "accuracy_vs_budget_niah_multikey.png", "accuracy_vs_kv_niah_multikey.png", "ppl_vs_position.png"}
    assert expected <= names
    for p in rep.files:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 1024, p
    page = rep.html_path.read_text()
    assert page.count("data:image/png;base64,") == len(rep.files)
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    assert "needle" in page and "streamingllm" in page and "Baseline check" in page
    assert "L=512" in rep.text and "L=128" in rep.text and "perplexity" in rep.text and "overview" in rep.text
    cells = aggregate(rows)
    full_ppl = cells[(rows[0]["model"], "ppl", "retain=full", 200)].ppl
    assert math.isclose(full_ppl["ppl"], full_ppl["one_pass_ppl"], rel_tol=1e-4)


def test_oracle_transformers_agrees_on_full_rows(grid: Path) -> None:
    rep = make_report(grid, oracle="transformers", oracle_samples=3, plots=False)
    assert rep.oracle is not None and rep.oracle["checked"] == 3, rep.oracle
    assert rep.oracle["agree"] == 3, rep.oracle["disagreements"]
    assert "oracle: 3/3" in rep.text and "Transformers oracle" in rep.html_path.read_text()


def test_cli_report(grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from longctx.cli import main

    assert main(["eval", "report", str(grid), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "needle" in out and "Baseline check" in out


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(LongctxError, match="no such directory"):
        load_results(tmp_path / "nope")
    with pytest.raises(LongctxError, match="no results.jsonl"):
        load_results(tmp_path)


def test_report_never_writes_through_a_symlink(grid: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(grid, run, ignore=shutil.ignore_patterns("report"))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / "report").mkdir()
    (run / "report" / "index.html").symlink_to(victim)
    with pytest.raises(LongctxError, match="symlink"):
        make_report(run, plots=False)
    assert victim.read_text() == "keep me"


def _good_line(**over: Any) -> dict[str, Any]:
    line = {"key": "k1", "model": "m", "spec": "retain=full", "task": "needle", "length": 128, "sample_id": "s0",
            "kind": "generate", "score": 1.0, "error": None}
    line.update(over)
    return line


def _write_lines(folder: Path, *lines: Any) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                                  for x in lines))
    return folder


@pytest.mark.parametrize(("bad", "match"), [
    (_good_line(length="abc"), r"results\.jsonl:2: field 'length' must be an integer"),
    (_good_line(length=True), r"results\.jsonl:2: field 'length' must be an integer"),
    (_good_line(length=0), r"results\.jsonl:2: field 'length' must be a positive"),
    (_good_line(correct="yes"), r"results\.jsonl:2: field 'correct' must be true/false"),
    (_good_line(spec=5), r"results\.jsonl:2: field 'spec' must be a string"),
    (_good_line(score="1"), r"results\.jsonl:2: field 'score' must be a number"),
    (_good_line(meta=[1]), r"results\.jsonl:2: field 'meta' must be an object"),
    (_good_line(kind="other"), r"results\.jsonl:2: field 'kind' must be"),
    (_good_line(time_to_first_token="fast"), r"results\.jsonl:2: field 'time_to_first_token' must be a number"),
    ({k: v for k, v in _good_line().items() if k != "task"}, r"results\.jsonl:2: missing required field 'task'"),
    ({k: v for k, v in _good_line().items() if k != "sample_id"}, r"results\.jsonl:2: missing field 'sample_id'"),
    (_good_line(kind="ppl", score=None, ppl_result={"nll_sum": 1.0, "count": 2, "nll": 0.5}),
     r"results\.jsonl:2: missing field 'ppl_result\.buckets'"),
    ([1, 2], r"results\.jsonl:2: a result line must be a JSON object, got list"),
    ("5", r"results\.jsonl:2: a result line must be a JSON object, got int"),
    ("null", r"results\.jsonl:2: a result line must be a JSON object"),
])
def test_load_results_names_file_line_and_field(tmp_path: Path, bad: Any, match: str) -> None:
    run = _write_lines(tmp_path / "run", _good_line(key="k0"), bad, _good_line(key="k2"))
    with pytest.raises(LongctxError, match=match) as e:
        load_results(run)
    assert "\n" not in str(e.value) and str(run / "results.jsonl") in str(e.value)


def test_load_results_skips_torn_lines_and_counts_them(tmp_path: Path) -> None:
    run = _write_lines(tmp_path / "run", _good_line(key="k0"), '{"key": "k1", "mod', _good_line(key="k2"))
    assert [r["key"] for r in load_results(run)] == ["k0", "k2"]
    rep = make_report(run, plots=False)
    assert "1 unparseable line(s) of results.jsonl skipped" in rep.text
    assert "1 unparseable line(s)" in rep.html_path.read_text()
    with pytest.raises(LongctxError, match=r"no result lines \(1 unparseable"):
        load_results(_write_lines(tmp_path / "torn", '{"key": "k1", "mod'))


def test_timings_are_labelled_batch_inclusive(tmp_path: Path) -> None:
    lines = [_good_line(key=f"k{i}", sample_id=f"s{i}", run_id="r1", kv_bytes_held=1 << 20, kv_bytes_full=2 << 20,
                        kv_bytes_peak=2 << 20, time_to_first_token=0.5, time_per_output_token=0.01)
             for i in range(3)]
    rep = make_report(_write_lines(tmp_path / "run", *lines), plots=False)
    kv = next(t for t in rep.tables if "KV held" in t.title and "needle" in t.title)
    assert "batch TTFT / TPOT" in kv.title
    assert kv.rows[0][2] == "1.00 MiB (50%) peak 2.00 MiB batch TTFT 500.0 ms, batch TPOT 10.0 ms (batch of 3)"
    assert "batch-inclusive" in kv.note and "not single-request latency" in kv.note
    assert "batch TTFT" in rep.text and "batch-inclusive" in rep.text
    page = rep.html_path.read_text()
    assert "<p class='note'>TTFT / TPOT are batch-inclusive" in page and "(batch of 3)" in page
