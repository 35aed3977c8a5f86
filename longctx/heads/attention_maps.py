"""Attention maps of chosen heads for a prompt (``longctx heads show FILE --attention PROMPT``).

The model a score file was made for runs the prompt once through the plain-torch reference attention
(:class:`~longctx.heads.contexts.ProbeContext`, the probe the retrieval scores use), and every chosen
(layer, kv-head) gets one panel: query position x key position, the attention probabilities averaged over the
query heads of that kv group (one KV row serves them all), on a log color scale so that sinks and the local
diagonal both show. Each panel's title carries the head's score from the file.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longctx.errors import LongctxError
from longctx.heads.store import Grid, HeadScores, HeadScoresError, check_model

if TYPE_CHECKING:
    from torch import Tensor

Head = tuple[int, int]  # (layer, kv-head)
DEFAULT_MAX_TOKENS = 512
PICK = 3  # heads from each end of the ranking when --heads is omitted
_HEAD = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def _ranges(num_layers: int, num_kv_heads: int) -> str:
    return f"layers 0-{num_layers - 1}, kv-heads 0-{num_kv_heads - 1}"


def parse_heads(text: str, num_layers: int, num_kv_heads: int) -> list[Head]:
    """``"L:H[,L:H...]"`` -> [(layer, kv-head)], in order, duplicates dropped; one-line error naming the ranges."""
    allowed = _ranges(num_layers, num_kv_heads)
    heads: list[Head] = []
    for part in text.split(","):
        m = _HEAD.fullmatch(part)
        if m is None:
            raise LongctxError(f"--heads: {part.strip()!r} is not LAYER:KV_HEAD (e.g. --heads 0:1,2:0); "
                               f"this model has {allowed}")
        head = (int(m[1]), int(m[2]))
        if head[0] >= num_layers or head[1] >= num_kv_heads:
            raise LongctxError(f"--heads: {head[0]}:{head[1]} is out of range; this model has {allowed}")
        if head not in heads:
            heads.append(head)
    return heads


def pick_heads(grid: Grid, k: int = PICK) -> list[Head]:
    """The ``k`` highest- and the ``k`` lowest-scoring heads of ``grid`` (highest first; each head once)."""
    ranked = sorted(((x, layer, h) for layer, row in enumerate(grid) for h, x in enumerate(row)),
                    key=lambda t: (-t[0], t[1], t[2]))
    heads: list[Head] = []
    for _x, layer, h in ranked[:k] + ranked[-k:]:
        if (layer, h) not in heads:
            heads.append((layer, h))
    return heads


@dataclass(frozen=True)
class AttentionRequest:
    """Validated ``--attention`` options (checked before any model loads)."""

    prompt: str
    heads: list[Head]
    png: Path
    model: str | None
    max_tokens: int
    field: str
    device: str


def attention_request(scores: HeadScores, file: str | Path, *, attention: str | None, heads: str | None,
                      png: str | None, model: str | None, max_tokens: int | None, field: str = "scores",
                      device: str = "cpu") -> AttentionRequest | None:
    """The attention-map request of ``longctx heads show``, or None without ``--attention``; options that need
    ``--attention`` are refused without it, ``--heads`` is parsed against the file's shape."""
    from longctx.heads.show import grid_of  # noqa: PLC0415

    if attention is None:
        given = [flag for flag, value in (("--heads", heads), ("--attention-png", png), ("--model", model),
                                          ("--max-tokens", max_tokens)) if value is not None]
        if given:
            raise LongctxError(f"{', '.join(given)}: only with --attention PROMPT (the attention maps' prompt)")
        return None
    if max_tokens is not None and max_tokens < 1:
        raise LongctxError(f"--max-tokens: must be a positive number of tokens, got {max_tokens}")
    grid = grid_of(scores, field)
    chosen = parse_heads(heads, scores.num_layers, scores.num_kv_heads) if heads is not None else pick_heads(grid)
    text = _prompt_text(attention)
    out = Path(png) if png else Path(file).with_name(Path(file).stem + ".attention.png")
    return AttentionRequest(prompt=text, heads=chosen, png=out, model=model,
                            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, field=field,
                            device=device)


def _prompt_text(value: str) -> str:
    """``--attention``: a file's text when it names a file (``-``: standard input), else the text itself."""
    from longctx.compare import read_text  # noqa: PLC0415

    if value == "-":
        return read_text(value, "--attention")
    try:
        is_file = "\n" not in value and Path(value).expanduser().is_file()
    except (OSError, ValueError):  # text too long for a file name, or with a NUL
        is_file = False
    if is_file:
        return read_text(str(Path(value).expanduser()), "--attention")
    if not value.strip():
        raise LongctxError("--attention: the prompt is empty")
    return value


def model_for(scores: HeadScores, model: str | None) -> str:
    """``--model``, else the model the file names if it is found (as a path, or in the model cache), else the
    default model."""
    from longctx.model.default_model import cache_dir, default_model_path  # noqa: PLC0415

    if model:
        return model
    name = scores.model_name
    if name:
        for candidate in (Path(name).expanduser(), cache_dir() / name):
            if candidate.exists():
                return str(candidate)
    path = default_model_path()
    print(f"longctx: the file's model {name or '?'} is not found here; using the default model {path} "
          f"(pass --model PATH to choose)", file=sys.stderr)
    return str(path)


def check_same_model(scores: HeadScores, file: str | Path, model: str, sha: str) -> None:
    """Refuse, in one line naming both, a model (``model``, content hash ``sha``) that is not the one ``scores``
    were made for."""
    if sha != scores.model_sha256:
        raise HeadScoresError(
            f"heads file {file} was scored for {scores.model_name or '?'} (sha256 {scores.model_sha256[:12]}), "
            f"not for {model} (sha256 {sha[:12]}); pass that model with --model PATH, or score this one with "
            f"`longctx heads score --model {model}`")


def checkpoint_sha256(path: str | Path) -> str:
    """The content hash :func:`longctx.heads.binding.model_sha256` gives a checkpoint, without loading it."""
    from longctx.eval.provenance import HASH_CACHE_NAME, model_fingerprint  # noqa: PLC0415
    from longctx.model.default_model import cache_dir  # noqa: PLC0415

    return model_fingerprint(path, cache_dir() / HASH_CACHE_NAME)["sha256"]


def head_maps(model: Any, ids: list[int] | Tensor, heads: list[Head]) -> dict[Head, Tensor]:
    """Attention probabilities [T queries, T keys] (float32, CPU) of each (layer, kv-head) in ``heads`` for the
    token ``ids``, averaged over the kv group's query heads, by one pass of ``model`` (a
    :class:`~longctx.model.decoder.CausalLM`) through :class:`ProbeContext` (full causal reference attention)."""
    import torch  # noqa: PLC0415

    from longctx.heads.contexts import ProbeContext  # noqa: PLC0415

    cfg = model.config
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, device=device)
    n = int(ids.shape[0])
    wanted: dict[int, list[int]] = {}
    for layer, h in heads:
        wanted.setdefault(layer, []).append(h)
    maps: dict[Head, Tensor] = {}

    def probe(layer: int, _rows: Tensor, probs: Tensor) -> None:  # probs [Hkv, G, n, n]
        for h in wanted.get(layer, ()):
            maps[(layer, h)] = probs[h].mean(0).cpu()

    with torch.no_grad():
        model(ids, ProbeContext(cfg, n, device, torch.arange(n), probe))
    return {head: maps[head] for head in heads}


def _score_label(scores: HeadScores, field: str) -> str:
    return f"{scores.method} score" if field == "scores" else field


def plot_maps(maps: dict[Head, Tensor], scores: HeadScores, path: str | Path, field: str = "scores",
              title: str = "") -> Path:
    """One panel per head (query position x key position, log color scale; masked keys blank) to a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    from longctx.heads.show import grid_of  # noqa: PLC0415

    grid = grid_of(scores, field)
    group = scores.num_heads // scores.num_kv_heads
    count = len(maps)
    cols = min(3, count)
    rows = -(-count // cols)
    dpi = 110
    n = max(int(p.shape[-1]) for p in maps.values())
    side = min(max(4.0, n / dpi + 1.1), 10.0)  # at least a pixel per key (nearest sampling drops none) up to ~1K
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.8, side * rows + 0.6), squeeze=False)
    positive = [float(p[p > 0].min()) for p in maps.values() if bool((p > 0).any())]
    norm = LogNorm(vmin=max(1e-5, min(positive, default=1e-5)), vmax=1.0)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="white")
    im = None
    for ax, ((layer, h), p) in zip(axes.flat, maps.items(), strict=False):
        arr = p.double().numpy()
        im = ax.imshow(np.ma.masked_less_equal(arr, 0.0), cmap=cmap, norm=norm, origin="upper",
                       interpolation="nearest", aspect="equal")
        queries = (f"mean of query heads {h * group}-{h * group + group - 1}" if group > 1
                   else f"query head {h}")
        ax.set_title(f"L{layer}.h{h}  {_score_label(scores, field)} {grid[layer][h]:.3f}\n{queries}", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.suptitle(title or f"{scores.model_name}: attention probabilities (log scale)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.93, 0.15, 0.015, 0.7)), label="attention probability")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def render_attention(scores: HeadScores, file: str | Path, request: AttentionRequest) -> Path:
    """Load the file's model, check it is that model, run the prompt (capped at ``max_tokens``) and write the
    PNG of ``request.heads``."""
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.heads import binding  # noqa: PLC0415

    source = model_for(scores, request.model)
    if Path(source).exists():  # refuse another model before loading it
        check_same_model(scores, file, source, checkpoint_sha256(source))
    llm = LLM(source, device=request.device)
    check_same_model(scores, file, source, binding.model_sha256(llm))
    check_model(scores, file, None, (llm.config.num_layers, llm.config.num_kv_heads))
    ids = llm.encode(request.prompt)
    if len(ids) > request.max_tokens:
        print(f"longctx: the prompt is {len(ids)} tokens; the attention maps use its first {request.max_tokens} "
              f"(--max-tokens)", file=sys.stderr)
        ids = ids[: request.max_tokens]
    maps = head_maps(llm.model, ids, request.heads)
    title = (f"{scores.model_name}: attention over {len(ids)} prompt tokens (log color scale; "
             f"blank = masked)")
    return plot_maps(maps, scores, request.png, request.field, title)
