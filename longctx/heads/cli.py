"""``longctx heads score`` and ``longctx heads show``: the head-analysis subcommands (parsers and handlers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``heads`` with its ``score`` and ``show`` subcommands on the top-level subparsers."""
    p = sub.add_parser("heads", help="attention-head analysis: retrieval scores, DuoAttention calibration, plots")
    hsub = p.add_subparsers(dest="heads_command", required=True)
    p = hsub.add_parser("score", help="score every (layer, kv-head) of a model into a head-score JSON file")
    p.add_argument("--model", help="checkpoint folder or .gguf file (default SmolLM2)")
    p.add_argument("--method", choices=["retrieval", "duo"], default="retrieval",
                   help="retrieval: copy-paste probe (+ sink statistics); duo: DuoAttention gate calibration")
    p.add_argument("--out", help="output file (default: cached beside the model in the user cache)")
    p.add_argument("--steps", type=int, help="duo: optimisation steps")
    p.add_argument("--samples", type=int, help="retrieval: probe prompts")
    p.add_argument("--length", type=int, help="retrieval: prompt length; duo: max prompt length (tokens)")
    p.add_argument("--sinks", type=int, help="sink tokens (duo: of the streaming attention)")
    p.add_argument("--window", type=int, help="recent window (duo: of the streaming attention)")
    p.add_argument("--seed", type=int, help="seed of the synthetic data")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)
    p = hsub.add_parser("show", help="print a head-score file as a table and write a layer x head heatmap PNG")
    p.add_argument("file", help="a head-score JSON file")
    p.add_argument("--field", default="scores", help="scores, or one of the file's extra fields (e.g. sink_mass)")
    p.add_argument("--png", help="heatmap path (default: FILE with .png)")
    p.set_defaults(func=cmd_show)


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from dataclasses import replace  # noqa: PLC0415

    from longctx.heads.duo import DuoSettings  # noqa: PLC0415
    from longctx.heads.retrieval import RetrievalSettings  # noqa: PLC0415

    if args.method == "duo":
        s = DuoSettings()
        given = {"steps": args.steps, "max_length": args.length, "sinks": args.sinks, "window": args.window,
                 "seed": args.seed}
    else:
        s = RetrievalSettings()
        given = {"samples": args.samples, "length": args.length, "sinks": args.sinks, "window": args.window,
                 "seed": args.seed}
    s = replace(s, **{k: v for k, v in given.items() if v is not None})
    if args.method == "duo" and s.min_length > s.max_length:
        s = replace(s, min_length=s.max_length)
    return s


def cmd_score(args: argparse.Namespace) -> int:
    from dataclasses import asdict  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    from longctx.cli import _resolve_model  # noqa: PLC0415
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.heads import binding  # noqa: PLC0415
    from longctx.heads.resolve import run_scoring  # noqa: PLC0415
    from longctx.heads.store import save_scores, settings_key  # noqa: PLC0415

    settings = _settings(args)
    llm = LLM(_resolve_model(args.model), device=args.device)
    out = Path(args.out) if args.out else binding.scores_cache_path(llm, args.method,
                                                                      settings_key(args.method, asdict(settings)))
    total = settings.steps if args.method == "duo" else settings.samples
    with tqdm(total=total, desc=f"heads {args.method}", unit="step" if args.method == "duo" else "prompt",
              disable=args.quiet, file=sys.stderr) as bar:
        scores = run_scoring(llm, args.method, settings, bar=bar)
    save_scores(scores, out)
    print(out)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from longctx.heads.show import heatmap, table  # noqa: PLC0415
    from longctx.heads.store import load_scores  # noqa: PLC0415

    scores = load_scores(args.file)
    print(table(scores, args.field))
    png = heatmap(scores, args.png or Path(args.file).with_suffix(".png"), args.field)
    print(f"heatmap: {png}")
    return 0
