"""Report plots: labelled log ticks over narrow spans, one colour per method across every plot."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_hex

from longctx.eval import plots as P
from longctx.eval.labels import label_specs, spec_label
from longctx.eval.report import Cell
from longctx.eval.stats import Summary

MiB = 1 << 20


def _cell(mean: float, held: float | None = None, *, ppl: dict[str, Any] | None = None) -> Cell:
    return Cell(Summary(mean, max(0.0, mean - 0.1), min(1.0, mean + 0.1), 10, "wilson"), 10, 0, held, held, held,
                90 * MiB, 0.01, 0.001, ppl=ppl, kind="ppl" if ppl else "generate")


def _visible_xtick_labels(fig: Any, ax: Any) -> list[str]:
    fig.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    labels = ax.get_xticklabels() + ax.get_xticklabels(minor=True)
    return [t.get_text() for t in labels if t.get_text().strip() and t.get_visible() and lo <= t.get_position()[0]
            <= hi]


SPECS = {name: str(spec_label(name).spec) for name in ("full", "snapkv:64", "snapkv:128", "h2o:64", "h2o:128")}


@pytest.mark.parametrize("held_mib", [(20, 45, 90), (22, 25, 28), (0.3, 0.5, 0.9)])
def test_accuracy_vs_kv_labels_ticks_over_a_narrow_span(held_mib: tuple[float, ...]) -> None:
    labels = label_specs(list(SPECS.values()))
    specs = [SPECS["snapkv:64"], SPECS["snapkv:128"], SPECS["full"]]
    cells = {("m", "needle", s, 1000): _cell(0.5, h * MiB) for s, h in zip(specs, held_mib, strict=True)}
    fig = P.accuracy_vs_kv_figure(cells, labels, "m", "needle", "t")
    try:
        ax = fig.axes[0]
        texts = _visible_xtick_labels(fig, ax)
        assert len(texts) >= 2, texts
        assert all(t.endswith(("KiB", "MiB")) for t in texts), texts
    finally:
        plt.close(fig)


def test_accuracy_vs_budget_labels_ticks_over_a_narrow_span() -> None:
    labels = label_specs([SPECS["full"], "snapkv:150", "snapkv:200"])
    cells = {("m", "needle", s, 1000): _cell(0.5) for s in labels}
    fig = P.accuracy_vs_budget_figure(cells, labels, "m", "needle", "t")
    try:
        texts = _visible_xtick_labels(fig, fig.axes[0])
        assert len(texts) >= 2, texts
    finally:
        plt.close(fig)


def test_human_bytes() -> None:
    assert P.human_bytes(22.5 * MiB) == "22.5 MiB"
    assert P.human_bytes(512 * 1024) == "512 KiB"
    assert P.human_bytes(3 << 30) == "3 GiB"
    assert P.human_bytes(100) == "100 B"


def _legend_colors(ax: Any) -> dict[str, str]:
    out = {}
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
        h = handle[0] if isinstance(handle, tuple) or hasattr(handle, "lines") else handle
        if hasattr(h, "get_facecolor") and not hasattr(h, "get_color"):
            color = h.get_facecolor()[0]
        else:
            color = h.get_color()
        out[label.split(":")[0]] = to_hex(color)
    return out


def test_one_colour_per_method_in_every_plot() -> None:
    labels = label_specs(list(SPECS.values()))
    colors = P.method_colors(labels)
    assert colors["full"] == "#000000" and colors["h2o"] != colors["snapkv"]
    buckets = [{"start": 0, "end": 50, "ppl": 5.0}, {"start": 50, "end": 100, "ppl": 4.0}]
    cells = {}
    for s in SPECS.values():
        cells[("m", "needle", s, 1000)] = _cell(0.5, (20 + len(s) % 7) * MiB)
    # Task "kv_only_snapkv" has no h2o: a per-plot colour cycle would give snapkv a different colour there.
    for s in (SPECS["full"], SPECS["snapkv:64"]):
        cells[("m", "other", s, 1000)] = _cell(0.4, 30 * MiB)
        cells[("m", "ppl", s, 1000)] = _cell(4.0, ppl={"buckets": buckets})
    figs = [P.accuracy_vs_budget_figure(cells, labels, "m", "needle", "t", colors),
            P.accuracy_vs_kv_figure(cells, labels, "m", "needle", "t", colors),
            P.accuracy_vs_kv_figure(cells, labels, "m", "other", "t", colors),
            P.accuracy_vs_budget_figure(cells, labels, "m", "other", "t", colors),
            P.ppl_vs_position_figure(cells, labels, "m", "ppl", "t", colors)]
    try:
        seen: dict[str, set[str]] = {}
        for fig in figs:
            for method, color in _legend_colors(fig.axes[0]).items():
                if method in colors:
                    seen.setdefault(method, set()).add(color)
        assert set(seen) == {"full", "snapkv", "h2o"}, seen
        for method, got in seen.items():
            assert got == {colors[method]}, (method, got)
    finally:
        for fig in figs:
            plt.close(fig)


def test_make_plots_uses_one_mapping(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    labels = label_specs([SPECS["full"], SPECS["snapkv:64"], SPECS["h2o:64"]])
    rows = [{"model": "m", "task": t, "spec": s, "length": 1000, "kind": "generate", "error": None}
            for t in ("a", "b") for s in labels]
    cells = {("m", "a", s, 1000): _cell(0.5, 25 * MiB) for s in labels}
    cells.update({("m", "b", s, 1000): _cell(0.5, 25 * MiB) for s in (SPECS["full"], SPECS["snapkv:64"])})
    got: list[dict[str, str]] = []
    real = P.accuracy_vs_kv_figure

    def spy(*a: Any, **k: Any) -> Any:
        fig = real(*a, **k)
        got.append(_legend_colors(fig.axes[0]))
        return fig

    monkeypatch.setattr(P, "accuracy_vs_kv_figure", spy)
    files = P.make_plots(rows, cells, labels, tmp_path)
    assert len(files) == 4 and len(got) == 2
    assert got[0]["snapkv"] == got[1]["snapkv"] and got[0]["full"] == got[1]["full"]


def test_select_specs_are_labelled_by_tokens_read_and_plotted_by_bytes_read() -> None:
    q256, q512 = str(spec_label("select=quest(tokens=256)").spec), str(spec_label("select=quest(tokens=512)").spec)
    labels = label_specs([SPECS["full"], q256, q512])
    assert labels[q256].budget == "read 256" and labels[q256].method_key == labels[q512].method_key
    assert P.labels_read(labels[q256]) and not P.labels_read(labels[SPECS["full"]])
    cells = {("m", "needle", s, 1000): _cell(0.5, 90 * MiB) for s in (SPECS["full"], q256, q512)}
    cells[("m", "needle", q256, 1000)].kv_bytes_read = 8 * MiB
    cells[("m", "needle", q512, 1000)].kv_bytes_read = 12 * MiB
    cells[("m", "needle", SPECS["full"], 1000)].kv_bytes_read = 90 * MiB
    fig = P.accuracy_vs_kv_figure(cells, labels, "m", "needle", "t", field="kv_bytes_read")
    try:
        xs = sorted(x for coll in fig.axes[0].collections for x, _ in coll.get_offsets())
        assert xs == [8 * MiB, 12 * MiB, 90 * MiB]
        assert "read per decode step" in fig.axes[0].get_xlabel()
    finally:
        plt.close(fig)
