"""``longctx heads score``, ``show`` and ``synth``: the head-analysis subcommands (parsers and handlers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longctx.cli import unit_fraction


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``heads`` with its ``score``, ``show`` and ``synth`` subcommands on the top-level subparsers."""
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
    p.add_argument("--min-length", type=int, help="duo: min prompt length (tokens)")
    p.add_argument("--reg", type=float, help="duo: L1 pressure on the gates (default 0.05, the paper's)")
    p.add_argument("--sinks", type=int, help="sink tokens (duo: of the streaming attention)")
    p.add_argument("--window", type=int, help="recent window (duo: of the streaming attention)")
    p.add_argument("--seed", type=int, help="seed of the synthetic data")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="duo: bf16 autocast or the model's fp32 (default auto: bf16 where the device multiplies bf16 "
                   "natively)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)
    p = hsub.add_parser("show", help="print a head-score file as a table and write a layer x head heatmap PNG")
    p.add_argument("file", help="a head-score JSON file")
    p.add_argument("--field", default="scores", help="scores, or one of the file's extra fields (e.g. sink_mass)")
    p.add_argument("--png", help="heatmap path (default: FILE with .png)")
    p.add_argument("--attention", metavar="PROMPT",
                   help="also plot attention maps of chosen heads for this prompt (text, a file, or - for stdin)")
    p.add_argument("--heads", help="--attention: L:H[,L:H...] (layer:kv-head; default top 3 and bottom 3 by --field)")
    p.add_argument("--model", help="--attention: checkpoint (default: the file's model if found, else SmolLM2)")
    p.add_argument("--attention-png", help="--attention: maps path (default: FILE with .attention.png)")
    p.add_argument("--max-tokens", type=int, help="--attention: keep the first N prompt tokens (default 512)")
    p.add_argument("--device", default="cpu", help="--attention: cpu or cuda[:N] (default cpu)")
    p.set_defaults(func=cmd_show)
    p = hsub.add_parser("synth", help="write a SYNTHETIC head-score file (a seeded random fraction of kv-heads "
                        "marked retrieval, nothing measured) for a model, to measure duo/razor/headkv speed and memory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder or .gguf file (hashed, not loaded)")
    src.add_argument("--shape", help="random weights of a `longctx bench` shape (1b, 8b, tiny), drawn like the bench "
                     "draws them (same --device type, --dtype, --weights-seed) so its model hash matches")
    p.add_argument("--retrieval-fraction", type=unit_fraction, required=True,
                   help="fraction of all (layer, kv-head) rows marked retrieval, e.g. 0.5")
    p.add_argument("--seed", type=int, default=0, help="seed of which rows are chosen (default 0)")
    p.add_argument("--method", choices=["duo", "retrieval"], default="duo",
                   help="method field of the file (default duo: retrieval rows score >= 0.75, the others < 0.25)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--device", default="cuda", help="--shape: device the weights are drawn on (default cuda)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="--shape: dtype (default bf16)")
    p.add_argument("--weights-seed", type=int, default=0, help="--shape: seed of the random weights (default 0)")
    p.set_defaults(func=cmd_synth)


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from dataclasses import replace  # noqa: PLC0415

    from longctx.heads.duo import DuoSettings  # noqa: PLC0415
    from longctx.heads.retrieval import RetrievalSettings  # noqa: PLC0415

    if args.method == "duo":
        s = DuoSettings()
        given = {"steps": args.steps, "max_length": args.length, "min_length": args.min_length, "reg": args.reg,
                 "sinks": args.sinks, "window": args.window,
                 "seed": args.seed, "precision": args.precision}
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
    from longctx.heads.attention_maps import attention_request, render_attention  # noqa: PLC0415
    from longctx.heads.show import heatmap, table  # noqa: PLC0415
    from longctx.heads.store import load_scores  # noqa: PLC0415

    scores = load_scores(args.file)
    request = attention_request(scores, args.file, attention=args.attention, heads=args.heads,
                                png=args.attention_png, model=args.model, max_tokens=args.max_tokens,
                                field=args.field, device=args.device)
    print(table(scores, args.field))
    png = heatmap(scores, args.png or Path(args.file).with_suffix(".png"), args.field)
    print(f"heatmap: {png}")
    if request is not None:
        print(f"attention maps: {render_attention(scores, args.file, request)}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from longctx.heads import synthetic  # noqa: PLC0415

    if args.model:
        out = synthetic.write_for_checkpoint(args.model, args.out, args.retrieval_fraction, args.seed, args.method)
    else:
        import torch  # noqa: PLC0415

        from longctx.bench.sweep import SHAPES, random_model, shape_config  # noqa: PLC0415
        from longctx.errors import LongctxError  # noqa: PLC0415

        if args.shape not in SHAPES:
            raise LongctxError(f"--shape: unknown shape {args.shape!r}; choose from {', '.join(SHAPES)}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise LongctxError("--device cuda: no CUDA GPU available (random weights drawn on the CPU differ from "
                               "a GPU's; use --device cpu for a CPU bench)")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        model = random_model(shape_config(args.shape, 1), args.device, dtype, seed=args.weights_seed)
        out = synthetic.write_for_random_model(model, f"<random {args.shape}>", args.out, args.retrieval_fraction,
                                               args.seed, args.method)
    print(out)
    print(f"synthetic head scores (not measured): {args.retrieval_fraction:g} of the kv-heads marked retrieval, "
          f"seed {args.seed}", file=sys.stderr)
    return 0
