"""Report: intervals, spec labels, the baseline check, and a tiny-model grid end to end (every plot, the HTML page,
the transformers oracle, the CLI)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from longctx.errors import LongctxError
from longctx.eval.report import Cell, aggregate, baseline_flags, label_specs, load_results, make_report, spec_label
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


def test_spec_labels_parse_method_and_budget() -> None:
    assert (spec_label("full").method, spec_label("full").budget) == ("full", "all")
    lab = spec_label("snapkv:512")
    assert (lab.method, lab.budget, lab.budget_tokens) == ("snapkv", "512", 512)
    lab = spec_label("streamingllm:0.25 int8")
    assert (lab.method, lab.budget, lab.budget_fraction) == ("streamingllm+int8", "25%", 0.25)
    labels = label_specs([str(spec_label(s).spec) for s in ("snapkv:64", "retain=snapkv(window=8) budget=uniform("
                                                                           "tokens=64)")])
    assert len({lab.method for lab in labels.values()}) == 2  # same short name, different methods: disambiguated


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
