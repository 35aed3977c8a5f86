"""Report plots (matplotlib, Agg backend): PNG files in ``DIR/report/``.

* ``needle_heatmap_<task>.png`` — score by needle depth × context length, one panel per method.
* ``accuracy_vs_budget_<task>.png`` — score vs KV budget (tokens), one line per method, one panel per length.
* ``accuracy_vs_kv_<task>.png`` — score vs KV bytes actually held (the Pareto view), one panel per length.

A method has one colour in every plot of a report (:func:`method_colors`).
* ``ppl_vs_position.png`` — perplexity per position bucket, one line per spec, one panel per length.

With several models, file names get a ``<model>_`` prefix.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from longctx.errors import LongctxError  # noqa: E402
from longctx.safe_io import open_for_write

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str) -> str:
    return _SLUG.sub("_", text).strip("_")[:60] or "x"


def _grid(n: int, ncols_max: int = 4, size: tuple[float, float] = (4.2, 3.4)) -> tuple[Any, list[Any]]:
    ncols = min(n, ncols_max)
    nrows = math.ceil(n / ncols)
    width = max(size[0] * ncols, 7.0)  # room for the figure title even with one panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, size[1] * nrows), squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> Path:
    with open_for_write(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return path


def human_bytes(n: float) -> str:
    """``23592960`` -> ``"22.5 MiB"``: at most 3 significant digits, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:g} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _log_x_ticks(ax: Any, xs: list[float], fmt: Any, base: int = 2, unit: float = 1.0) -> None:
    """Labelled ticks on a log x axis whatever the span of ``xs``.

    Over a wide span (a factor ``base**3`` or more) the major ticks sit at powers of ``base``; over a narrow
    one — where no power, or only one, falls in the view, and matplotlib would label nothing — they sit at
    round values (round in multiples of ``unit``, e.g. 20, 40, 60, 80 MiB) within the data. Minor ticks are never
    labelled.
    """
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    if hi / lo >= base ** 3:
        ax.xaxis.set_major_locator(LogLocator(base=base, numticks=8))
        return
    if hi == lo:
        ticks = [lo]
    else:
        ticks = [t * unit for t in MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo / unit, hi / unit)
                 if t > 0]
        # The outermost round values may fall outside the data: keep what is in range, and the data ends when
        # fewer than two are left.
        inside = [t for t in ticks if lo * 0.98 <= t <= hi * 1.02]
        ticks = inside if len(inside) >= 2 else [lo, hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(FixedLocator([]))


def method_colors(labels: dict[str, Any]) -> dict[str, str]:
    """One colour per method, the same in every plot of a report: ``full`` is black, the others take tab10 (tab20
    past ten methods, cycled) in the sorted order of their names."""
    methods = sorted({lab.method for lab in labels.values() if not lab.is_full})
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, m in enumerate(methods)}
    colors.update({lab.method: "#000000" for lab in labels.values() if lab.is_full})
    return colors


def _colors(labels: dict[str, Any], colors: dict[str, str] | None) -> dict[str, str]:
    return colors if colors is not None else method_colors(labels)


def _label(lab: Any) -> str:
    return lab.method if lab.budget in ("all", "?") else f"{lab.method}:{lab.budget}"


def _budget_tokens(lab: Any, length: int) -> float | None:
    if lab.budget_tokens:
        return float(lab.budget_tokens)
    if lab.budget_fraction:
        return lab.budget_fraction * length
    return None


def needle_heatmap(rows: list[dict[str, Any]], labels: dict[str, Any], task: str, title: str, path: Path) -> Path:
    """Mean score per (depth, length), one panel per spec."""
    data: dict[str, dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("error") or r.get("score") is None or "depth" not in (r.get("meta") or {}):
            continue
        data[r["spec"]][(round(float(r["meta"]["depth"]), 3), int(r["length"]))].append(float(r["score"]))
    specs = [s for s in labels if s in data]
    depths = sorted({d for s in specs for d, _ in data[s]})
    if len(depths) > 12:  # continuous depths: bin into tenths
        for s in specs:
            binned: dict[tuple[float, int], list[float]] = defaultdict(list)
            for (d, L), v in data[s].items():
                binned[(min(0.9, math.floor(d * 10) / 10), L)].extend(v)
            data[s] = binned
        depths = sorted({d for s in specs for d, _ in data[s]})
    lengths = sorted({L for s in specs for _, L in data[s]})
    fig, axes = _grid(len(specs))
    im = None
    for ax, s in zip(axes, specs, strict=True):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for (d, L), v in data[s].items():
            grid[depths.index(d)][lengths.index(L)] = sum(v) / len(v)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(_label(labels[s]), fontsize=9)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="score")
    fig.suptitle(title)
    return _save(fig, path)


def _label_axes(ax: Axes, xlabel: str, ylabel: str, length: int) -> None:
    """The common finish of one context length's panel: labels, title, grid (the legend is the figure's)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"L = {length}", fontsize=9)
    ax.grid(alpha=0.3)


def _finish(fig: Any, axes: list[Any], title: str) -> Any:
    """Title, and one legend for every panel below them (per-panel legends covered the points once a sweep had
    more than a few methods or long labels)."""
    fig.suptitle(title)
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        widest = max(len(label) for label in entries)
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", fontsize=7,
                   ncols=max(1, min(4, len(entries), 160 // max(widest, 1))))
    return fig


def accuracy_vs_budget(cells: dict, labels: dict[str, Any], model: str, task: str, title: str, path: Path,
                       colors: dict[str, str] | None = None) -> Path:
    return _save(accuracy_vs_budget_figure(cells, labels, model, task, title, colors), path)


def accuracy_vs_budget_figure(cells: dict, labels: dict[str, Any], model: str, task: str, title: str,
                              colors: dict[str, str] | None = None) -> Any:
    colors = _colors(labels, colors)
    keys = [k for k in cells if k[0] == model and k[1] == task and cells[k].summary.n]
    lengths = sorted({k[3] for k in keys})
    fig, axes = _grid(len(lengths))
    for ax, L in zip(axes, lengths, strict=True):
        by_method: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
        for k in keys:
            if k[3] != L:
                continue
            lab, sm = labels[k[2]], cells[k].summary
            if lab.is_full:
                ax.axhline(sm.mean, color=colors[lab.method], ls="--", lw=1, label="full")
                if not math.isnan(sm.lo):
                    ax.axhspan(sm.lo, sm.hi, color=colors[lab.method], alpha=0.07)
                continue
            b = _budget_tokens(lab, L)
            if b is None:
                ax.axhline(sm.mean, ls=":", lw=1, color=colors[lab.method], label=_label(lab))
                continue
            by_method[lab.method].append((b, sm.mean, sm.lo, sm.hi))
        xs_all = [p[0] for pts in by_method.values() for p in pts]
        for method, pts in sorted(by_method.items()):
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            lo = [p[1] - p[2] if not math.isnan(p[2]) else 0 for p in pts]
            hi = [p[3] - p[1] if not math.isnan(p[3]) else 0 for p in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors[method], label=method)
        if xs_all:
            ax.set_xscale("log", base=2)
            _log_x_ticks(ax, xs_all, lambda v: f"{v:g}", base=2)
        ax.set_ylim(-0.05, 1.05)
        _label_axes(ax, "KV budget (tokens per row)", "score", L)
    return _finish(fig, axes, title)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated (less memory and at least as good a score), sorted by memory."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def labels_read(label: Any) -> bool:
    """Whether a spec's label is a select method's (its budget is what each step reads)."""
    return str(label.budget).startswith("read ") or "select=" in label.spec and "select=all" not in label.spec


def accuracy_vs_kv(cells: dict, labels: dict[str, Any], model: str, task: str, title: str, path: Path,
                   colors: dict[str, str] | None = None, field: str = "kv_bytes_held") -> Path:
    return _save(accuracy_vs_kv_figure(cells, labels, model, task, title, colors, field), path)


_KV_AXES = {"kv_bytes_held": "KV held at end (measured)", "kv_bytes_read": "KV read per decode step (measured)"}


def accuracy_vs_kv_figure(cells: dict, labels: dict[str, Any], model: str, task: str, title: str,
                          colors: dict[str, str] | None = None, field: str = "kv_bytes_held") -> Any:
    """Score vs KV bytes held (or read per decode step, ``field="kv_bytes_read"``); x in bytes on a log axis,
    ticks labelled like ``22.5 MiB``."""
    colors = _colors(labels, colors)
    keys = [k for k in cells if k[0] == model and k[1] == task and cells[k].summary.n
            and getattr(cells[k], field) is not None]
    lengths = sorted({k[3] for k in keys})
    fig, axes = _grid(len(lengths))
    for ax, L in zip(axes, lengths, strict=True):
        pts = []
        seen = set()
        for k in keys:
            if k[3] != L:
                continue
            lab, c = labels[k[2]], cells[k]
            x = float(getattr(c, field))
            pts.append((x, c.summary.mean))
            ax.scatter([x], [c.summary.mean], color=colors[lab.method], marker="s" if lab.is_full else "o",
                       label=lab.method if lab.method not in seen else None, zorder=3)
            seen.add(lab.method)
            if lab.budget not in ("all", "?", "per head"):  # an amount worth reading beside the point
                ax.annotate(lab.budget, (x, c.summary.mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(pts)
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", lw=1, alpha=0.6,
                    label="Pareto front")
        ax.set_xscale("log", base=2)
        xs = [p[0] for p in pts]
        unit = float(1 << (10 * min(3, int(math.log2(max(xs)) // 10)))) if max(xs) >= 1 else 1.0
        _log_x_ticks(ax, xs, human_bytes, base=2, unit=unit)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
        ax.set_ylim(-0.05, 1.05)
        _label_axes(ax, _KV_AXES[field], "score", L)
    return _finish(fig, axes, title)


def ppl_vs_position(cells: dict, labels: dict[str, Any], model: str, task: str, title: str, path: Path,
                    colors: dict[str, str] | None = None) -> Path:
    return _save(ppl_vs_position_figure(cells, labels, model, task, title, colors), path)


_STYLES = ["-", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
_MARKERS = ["o", "^", "s", "v", "D", "P"]


def ppl_vs_position_figure(cells: dict, labels: dict[str, Any], model: str, task: str, title: str,
                           colors: dict[str, str] | None = None) -> Any:
    """One line per spec: colour = method (as in every plot), line style and marker = which of its budgets."""
    colors = _colors(labels, colors)
    keys = [k for k in cells if k[0] == model and k[1] == task and cells[k].ppl]
    lengths = sorted({k[3] for k in keys})
    # The n-th budget of a method (in the labels' order) gets the n-th style, the same at every length.
    rank: dict[str, int] = {}
    per_method: dict[str, int] = defaultdict(int)
    for s, lab in labels.items():
        rank[s] = per_method[lab.method]
        per_method[lab.method] += 1
    fig, axes = _grid(len(lengths))
    for ax, L in zip(axes, lengths, strict=True):
        for k in sorted((k for k in keys if k[3] == L), key=lambda k: (not labels[k[2]].is_full, k[2])):
            lab = labels[k[2]]
            b = [x for x in cells[k].ppl["buckets"] if x["ppl"] is not None and math.isfinite(x["ppl"])]
            i = rank.get(k[2], 0)
            ax.plot([(x["start"] + x["end"]) / 2 for x in b], [x["ppl"] for x in b], marker=_MARKERS[i % 6], ms=3,
                    ls="--" if lab.is_full else _STYLES[i % len(_STYLES)], color=colors[lab.method],
                    label=_label(lab))
            bud = _budget_tokens(lab, L)
            if bud is not None and bud < L:
                ax.axvline(bud, color=ax.lines[-1].get_color(), lw=0.6, alpha=0.4)
        ax.set_yscale("log")
        _label_axes(ax, "token position", "perplexity", L)
    return _finish(fig, axes, title)


def make_plots(rows: list[dict[str, Any]], cells: dict, labels: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every plot the results support; returns the PNG paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = {s: labels[s] for s in sorted(labels, key=lambda s: (not labels[s].is_full, labels[s].method,
                                                                 labels[s].budget_tokens or 0,
                                                                 labels[s].budget_fraction or 0.0, s))}
    colors = method_colors(labels)  # once per report: a method has one colour in every plot
    models = sorted({r["model"] for r in rows})
    files: list[Path] = []
    for model in models:
        prefix = f"{slug(Path(model).name)}_" if len(models) > 1 else ""
        mname = Path(model).name
        mrows = [r for r in rows if r["model"] == model]
        tasks = sorted({r["task"] for r in mrows})
        for task in tasks:
            trows = [r for r in mrows if r["task"] == task]
            is_ppl = any(r.get("kind") == "ppl" for r in trows)
            try:
                if is_ppl:
                    if any(cells[k].ppl for k in cells if k[0] == model and k[1] == task):
                        files.append(ppl_vs_position(cells, order, model, task, f"{mname}: perplexity vs position",
                                                     out_dir / f"{prefix}ppl_vs_position"
                                                     f"{'' if task == 'ppl' else '_' + slug(task)}.png", colors))
                    continue
                if not any(cells[k].summary.n for k in cells if k[0] == model and k[1] == task):
                    continue
                if any("depth" in (r.get("meta") or {}) for r in trows if not r.get("error")):
                    files.append(needle_heatmap(trows, order, task, f"{mname} / {task}: score by depth × length",
                                                out_dir / f"{prefix}needle_heatmap_{slug(task)}.png"))
                files.append(accuracy_vs_budget(cells, order, model, task, f"{mname} / {task}: score vs budget",
                                                out_dir / f"{prefix}accuracy_vs_budget_{slug(task)}.png", colors))
                if any(cells[k].kv_bytes_held is not None for k in cells if k[0] == model and k[1] == task):
                    files.append(accuracy_vs_kv(cells, order, model, task,
                                                f"{mname} / {task}: score vs KV bytes held",
                                                out_dir / f"{prefix}accuracy_vs_kv_{slug(task)}.png", colors))
                if any(labels_read(order[k[2]]) for k in cells if k[0] == model and k[1] == task):
                    files.append(accuracy_vs_kv(cells, order, model, task,
                                                f"{mname} / {task}: score vs KV bytes read per decode step",
                                                out_dir / f"{prefix}accuracy_vs_read_{slug(task)}.png", colors,
                                                field="kv_bytes_read"))
            except ValueError as e:  # matplotlib refuses degenerate data; say which plot
                raise LongctxError(f"plot for {mname}/{task} failed: {e}") from None
    return files
