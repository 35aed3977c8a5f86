"""Tables and heatmaps of a head-score file (``longctx heads show``)."""

from __future__ import annotations

from pathlib import Path

from longctx.heads.store import Grid, HeadScores


def table(scores: HeadScores, field: str = "scores") -> str:
    """A text table: one line per layer, one column per kv-head, plus the file's header."""
    grid = grid_of(scores, field)
    lines = [f"{scores.method} scores of {scores.model_name} (sha256 {scores.model_sha256[:12]}), "
             f"{scores.num_layers} layers x {scores.num_kv_heads} kv-heads ({scores.num_heads} query heads); "
             f"field: {field}",
             "settings: " + ", ".join(f"{k}={v}" for k, v in sorted(scores.settings.items()))]
    if scores.history:
        lines.append(f"loss: {scores.history[0]:.4f} -> {scores.history[-1]:.4f} over {len(scores.history)} steps")
    lines.append("layer | " + " ".join(f"h{h:<5}" for h in range(scores.num_kv_heads)))
    lines += [f"{layer:5d} | " + " ".join(f"{x:6.3f}" for x in row) for layer, row in enumerate(grid)]
    flat = sorted(((x, layer, h) for layer, row in enumerate(grid) for h, x in enumerate(row)), reverse=True)
    lines.append("top rows: " + ", ".join(f"L{layer}.h{h}={x:.3f}" for x, layer, h in flat[:10]))
    return "\n".join(lines)


def grid_of(scores: HeadScores, field: str) -> Grid:
    if field == "scores":
        return scores.scores
    if field not in scores.extra:
        from longctx.heads.store import HeadScoresError  # noqa: PLC0415

        raise HeadScoresError(f"the file has no field {field!r}; fields: {', '.join(['scores', *scores.extra])}")
    return scores.extra[field]


def heatmap(scores: HeadScores, path: str | Path, field: str = "scores") -> Path:
    """A layer x kv-head heatmap PNG of ``field``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    grid = grid_of(scores, field)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * scores.num_kv_heads + 2), max(3.0, 0.25 * scores.num_layers + 1)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
    ax.set_xlabel("kv-head")
    ax.set_ylabel("layer")
    ax.set_title(f"{scores.model_name}: {scores.method} {field}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
