"""The ``longctx`` command: info, generate, compare, methods, demo, serve, bench and eval.

User errors (bad paths, corrupt files, malformed specs, prompts that do not
fit) print one line ``longctx: error: ...`` and exit with status 2; only bugs
show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from longctx.errors import LongctxError
from longctx.units import human_bytes


def cmd_info(args: argparse.Namespace) -> int:
    from longctx.model.loader import read_config  # noqa: PLC0415

    cfg, path = read_config(args.path)
    kinds = sorted(set(cfg.layer_types)) if cfg.layer_types else ["full_attention"]
    rows = [
        ("model", str(path)),
        ("architecture", cfg.model_type),
        ("parameters", f"{cfg.num_params / 1e6:.1f} M"),
        ("layers", str(cfg.num_layers)),
        ("hidden size", str(cfg.hidden_size)),
        ("attention heads", f"{cfg.num_heads} query / {cfg.num_kv_heads} kv, head dim {cfg.head_dim}"),
        ("layer kinds", ", ".join(f"{k} x{cfg.layer_types.count(k)}" for k in kinds) if cfg.layer_types else kinds[0]),
        ("sliding window", str(cfg.sliding_window) if cfg.sliding_window else "-"),
        ("context length", str(cfg.max_position_embeddings)),
        ("rope", f"{cfg.rope.rope_type}, theta {cfg.rope.theta:g}"),
        ("vocab size", str(cfg.vocab_size)),
        ("KV bytes per token", f"{cfg.kv_bytes_per_token} (bf16/fp16), {2 * cfg.kv_bytes_per_token} (fp32)"),
        ("KV at full context", human_bytes(cfg.kv_bytes_per_token * cfg.max_position_embeddings) + " (bf16)"),
    ]
    if args.json:
        print(json.dumps(dict(rows), indent=2))
    else:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from longctx.kv.registry import AXES, AXIS_HELP, describe, methods, params_of  # noqa: PLC0415
    from longctx.kv.spec import DEFAULTS  # noqa: PLC0415

    for axis in AXES:
        print(f"{axis}: {AXIS_HELP[axis]} (default: {DEFAULTS[axis]})")
        for name, cls in methods(axis).items():
            print(f"  {name:<14} {describe(cls)}")
            for p in params_of(cls):
                print(f"      {p.name + '=' + repr(p.default):<22} {p.help}")
        print()
    print("Spec syntax: axis=method(param=value,...) separated by spaces, e.g.")
    print("  retain=snapkv(window=32,kernel=5) budget=pyramid(tokens=1024) positions=rerotate")
    print("Aliases: full | METHOD:TOKENS (snapkv:1024) | METHOD:FRACTION (h2o:0.25) | int8 | int4 | rerotate")
    return 0


def _load_prompts(args: argparse.Namespace) -> list[str]:
    from longctx.compare import read_text  # noqa: PLC0415

    prompts = list(args.prompt or [])
    files = args.prompt_file or []
    if files.count("-") > 1:
        raise LongctxError("--prompt-file -: standard input can be read only once")
    for f in files:
        prompts.append(read_text(f, "--prompt-file", allow_empty=True))
    if not prompts and not args.messages_file:
        raise LongctxError("give a prompt with --prompt TEXT, --prompt-file FILE or --messages-file FILE")
    if prompts and args.messages_file:
        raise LongctxError("--messages-file: give it instead of --prompt/--prompt-file, not with them")
    return prompts


def _resolve_model(model: str | None) -> str:
    if model:
        return model
    from longctx.model.default_model import default_model_path  # noqa: PLC0415

    return str(default_model_path())


def cmd_generate(args: argparse.Namespace) -> int:
    from longctx.compare import build_messages, load_messages  # noqa: PLC0415
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415
    from longctx.kv.spec import KVSpec  # noqa: PLC0415

    prompts = _load_prompts(args)
    conversations = None
    if args.messages_file:
        if args.messages_file == "-" and "-" in (args.prompt_file or ()):
            raise LongctxError("--messages-file -: standard input is already read by --prompt-file -")
        conversations = [build_messages(None, messages=load_messages(args.messages_file), system=args.system)]
    elif args.system is not None:  # --system implies chat
        conversations = [build_messages(None, p, system=args.system) for p in prompts]
    spec = KVSpec.parse(args.kv)  # fail on a bad spec before loading the model
    if "" in (args.stop or ()):
        raise LongctxError("--stop: a stop string must not be empty")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()))
    except ValueError as e:  # name the option as the user spelled it: "top_p must ..." -> "--top-p must ..."
        msg = str(e)
        field = msg.split(" ", 1)[0]
        raise LongctxError("--" + field.replace("_", "-") + msg[len(field):] if vars(args).get(field) is not None
                           else msg) from None
    llm = LLM(_resolve_model(args.model), device=args.device, dtype=args.dtype, **_kv_memory(args))
    if conversations is not None:
        outs = llm.chat(conversations, params, kv=spec, progress=not args.quiet)
    else:
        outs = llm.generate(prompts, params, kv=spec, chat=args.chat, progress=not args.quiet)
    for i, out in enumerate(outs):
        if args.json:
            print(json.dumps(_output_json(out)))
        else:
            if len(outs) > 1:
                print(f"--- prompt {i}")
            print(out.text)
        if args.stats:
            print_stats(out, file=sys.stderr)
    return 0


def _output_json(out) -> dict:  # noqa: ANN001
    """One generate result as a JSON-able dict (the per-layer KV details of ``--stats`` left out)."""
    s = out.stats
    stats = {k: getattr(s, k) for k in ("prompt_tokens", "generated_tokens", "kv_bytes_held", "kv_bytes_after_prefill",
                                        "kv_bytes_peak", "kv_bytes_full", "time_to_first_token",
                                        "time_per_output_token")}
    return {"text": out.text, "token_ids": list(out.token_ids), "prompt_token_ids": list(out.prompt_token_ids),
            "finish_reason": s.finish_reason, "kv": out.kv_spec, "stats": stats}


def cmd_compare(args: argparse.Namespace) -> int:
    from longctx.compare import (  # noqa: PLC0415
        build_messages,
        format_table,
        load_messages,
        parse_specs,
        read_text,
        run_compare,
    )
    from longctx.engine.llm import LLM  # noqa: PLC0415

    if args.document == "-" and args.messages_file == "-":
        raise LongctxError("--document - and --messages-file -: standard input can be read only once")
    if args.document is None and args.messages_file is None:
        raise LongctxError("give a document with --document FILE (or - for standard input), or --messages-file FILE")
    if args.question is not None and args.messages_file is not None:
        raise LongctxError("give --question TEXT or --messages-file FILE, not both")
    if args.question is None and args.messages_file is None:
        raise LongctxError("give a question with --question TEXT or --messages-file FILE")
    document = read_text(args.document, "--document") if args.document is not None else None
    messages = load_messages(args.messages_file) if args.messages_file is not None else None
    conversation = build_messages(document, args.question, messages, system=args.system)
    specs = parse_specs(args.kv)  # all checked before the model loads
    model = _resolve_model(args.model)
    llm = LLM(model, device=args.device, dtype=args.dtype, **_kv_memory(args))
    results = run_compare(llm, conversation, specs, max_tokens=args.max_tokens, progress=not args.quiet)
    if args.json:
        print(json.dumps({"model": model, "results": results}, indent=2))
    else:
        print(format_table(results))
    return 0


def print_stats(out, file=sys.stdout) -> None:  # noqa: ANN001
    s = out.stats
    print(f"[kv] spec: {out.kv_spec}", file=file)
    print(f"[kv] prompt {s.prompt_tokens} tok, generated {s.generated_tokens} tok ({s.finish_reason})", file=file)
    print(f"[kv] held after prefill {human_bytes(s.kv_bytes_after_prefill)}, at end {human_bytes(s.kv_bytes_held)}, "
          f"peak {human_bytes(s.kv_bytes_peak)}; full cache would hold {human_bytes(s.kv_bytes_full)}", file=file)
    if s.kv_bytes_read_per_step is not None:
        print(f"[kv] read per decode step (select): {human_bytes(int(s.kv_bytes_read_per_step))}", file=file)
    if s.kv and s.kv.budget_tokens:
        print(f"[kv] budget per layer (tokens): {s.kv.budget_tokens}", file=file)
    if s.kv and s.kv.final_tokens_per_row:
        per_layer = [sum(r) for r in s.kv.final_bytes_per_row]
        print(f"[kv] bytes held per layer: {per_layer}", file=file)
        print(f"[kv] tokens held per layer x kv-head: {s.kv.final_tokens_per_row}", file=file)
    print(f"[time] first token {s.time_to_first_token * 1000:.0f} ms, "
          f"{s.time_per_output_token * 1000:.1f} ms per output token", file=file)


def cmd_demo(args: argparse.Namespace) -> int:
    from longctx.demo import run_demo  # noqa: PLC0415

    return run_demo(model=args.model, device=args.device, dtype=args.dtype, tokens=args.tokens,
                    max_kv_bytes=_kv_memory(args).get("max_kv_bytes", 8 << 30))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415
    except ImportError:
        raise LongctxError("`longctx serve` needs FastAPI and uvicorn: pip install 'longctx[server]'") from None
    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.kv.spec import KVSpec  # noqa: PLC0415
    from longctx.server.app import build_app  # noqa: PLC0415
    from longctx.server.serve import bind, run_server  # noqa: PLC0415

    KVSpec.parse(args.kv)  # fail on a bad spec before loading the model
    api_key = args.api_key or os.environ.get("LONGCTX_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"longctx: warning: listening on {args.host} without an API key (set --api-key or LONGCTX_API_KEY)",
              file=sys.stderr)
    sock = bind(args.host, args.port)  # a port in use fails before the model loads
    signal.signal(signal.SIGTERM, _stop_loading)  # until uvicorn takes the signals over: stop quietly, exit 0
    llm = LLM(_resolve_model(args.model), device=args.device, dtype=args.dtype, **_kv_memory(args),
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_waiting=args.max_waiting)
    app = build_app(llm, served_model_name=args.served_model_name, default_kv=args.kv, api_key=api_key,
                    max_body_bytes=max(1, int(args.max_body_mb * (1 << 20))), shutdown_timeout=args.shutdown_timeout)
    return run_server(app, sock=sock, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                      access_log=not args.no_access_log)


def _stop_loading(signum: int, frame: object) -> NoReturn:
    raise SystemExit(0)


def _nonnegative(unit: str):  # noqa: ANN202
    """An argparse type: a finite number >= 0 (of ``unit``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
        if not 0 <= value < float("inf"):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be a number of {unit} >= 0, got {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    """--port: 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {text!r}")
    return value


def _int_list(text: str, what: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except (ValueError, OverflowError):
            raise LongctxError(f"{what}: {part!r} is not a number (e.g. 4k,16k or 4096)") from None
        if out[-1] < 1:
            raise LongctxError(f"{what}: {part!r} must be a positive number (e.g. 4k,16k or 4096)")
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from longctx.bench.sweep import SHAPES, run_bench  # noqa: PLC0415
    from longctx.kv.spec import KVSpec  # noqa: PLC0415

    shapes = [s.strip() for s in args.shapes.split(",")]
    for s in shapes:
        if s not in SHAPES:
            raise LongctxError(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    from longctx.heads.synthetic import uses_synthetic  # noqa: PLC0415

    specs = [s.strip() for s in args.kv.split(";") if s.strip()]
    for s in specs:
        KVSpec.parse(s)  # fail before building models
    if any(uses_synthetic(s) for s in specs) != (args.synthetic_heads is not None):
        raise LongctxError("--synthetic-heads FRACTION and a --kv spec with heads=synthetic go together "
                           "(e.g. --synthetic-heads 0.5 --kv \"full; budget=duo(heads=synthetic)\")")
    if args.device.startswith("cuda"):
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise LongctxError("--device cuda: no CUDA GPU available (use --device cpu --shapes tiny to try it)")
    run_bench(shapes, _int_list(args.contexts, "--contexts"), _int_list(args.batches, "--batches"),
              specs, device=args.device, dtype=args.dtype,
              new_tokens=args.new_tokens, baseline=not args.no_baseline, out=Path(args.out) if args.out else None,
              kv_memory_gb=args.kv_memory, synthetic_heads=args.synthetic_heads, synthetic_seed=args.synthetic_seed)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from longctx.bench.serve import DEFAULT_SPECS, ServeSettings, format_table, run_serve, split_specs  # noqa: PLC0415

    if args.arrival != "poisson":
        for flag, value in (("--rate", args.rate), ("--ttft-slo", args.ttft_slo)):
            if value is not None:
                raise LongctxError(f"{flag}: applies to Poisson arrivals; add --arrival poisson")
    specs = split_specs(args.kv) if args.kv else list(DEFAULT_SPECS)
    settings = ServeSettings(
        model=args.model, shape=args.shape, device=args.device, dtype=args.dtype, specs=specs,
        num_requests=args.num_requests, prompt_len=args.prompt_len, output_len=args.output_len,
        arrival=args.arrival, rate=args.rate if args.rate is not None else 4.0, seed=args.seed,
        kv_memory_gb=args.kv_memory, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        baseline=args.baseline, ttft_slo=args.ttft_slo, warmup=args.warmup, out=args.out, progress=not args.quiet)
    data = run_serve(settings)
    print(format_table(data))
    if args.out:
        print(f"-> {Path(args.out) / 'serve.json'}, {Path(args.out) / 'serve.png'}")
    return 0


def _prompt_len(text: str) -> tuple[int, int]:
    """--prompt-len: N or MIN:MAX tokens."""
    parts = text.split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX tokens, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX tokens, got {text!r}")
    return lo, hi


def cmd_eval_run(args: argparse.Namespace) -> int:
    from longctx.eval.runner import run_grid  # noqa: PLC0415

    models = args.model or [_resolve_model(None)]
    summary = run_grid(models, args.kv, args.tasks, args.lengths, args.samples, seed=args.seed, out_dir=args.out,
                       haystack=args.haystack, device=args.device, dtype=args.dtype, chat=not args.no_chat,
                       progress=not args.quiet, max_kv_bytes=int(args.kv_memory * (1 << 30)),
                       retry_errors=args.retry_errors)
    print(f"{summary.written} results written, {summary.skipped} already done, {summary.errors} errors "
          f"({summary.seconds:.1f} s) -> {summary.results_path}")
    print(f"next: longctx eval report {args.out}")
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    from longctx.eval.report import make_report  # noqa: PLC0415

    report = make_report(args.dir, oracle=args.oracle, oracle_samples=args.oracle_samples, device=args.device,
                         plots=not args.no_plots, progress=True)
    print(report.text)
    return 0


MAX_GIB = 1 << 20  # 1 PiB: larger values are typos


def _number_arg(convert, valid, expected: str, invalid: str, doc: str):  # noqa: ANN001, ANN202
    """An argparse ``type``: ``convert(text)`` ("{expected}, got ..." if that fails), then ``valid(value)``
    ("{invalid}, got ..." if not)."""
    def parse(text: str):  # noqa: ANN202
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{invalid}, got {text!r}")
        return value

    parse.__doc__ = doc
    return parse


_positive_int = _number_arg(int, lambda v: v >= 1, "expected a positive integer", "must be a positive integer",
                            "A count that must be at least 1.")
_count = _number_arg(int, lambda v: v >= 0, "expected an integer >= 0", "must be an integer >= 0",
                     "A count that may be 0.")
_positive_float = _number_arg(float, lambda v: 0 < v < float("inf"), "expected a positive number",  # rejects NaN
                              "must be a positive number", "A finite number above 0 (a rate, seconds).")
_fraction = _number_arg(float, lambda v: 0 < v <= 1, "expected a number in (0, 1]", "expected a number in (0, 1]",
                        "--gpu-memory-utilization: a number in (0, 1].")
unit_fraction = _number_arg(float, lambda v: 0 <= v <= 1, "expected a fraction in [0, 1]", "must be in [0, 1]",
                            "A fraction in [0, 1] (e.g. of kv-heads).")
_gib = _number_arg(float, lambda v: 0 < v <= MAX_GIB, "expected a number of GiB",  # rejects NaN and inf
                   f"must be a positive number of GiB up to {MAX_GIB}", "--kv-memory: a positive number of GiB.")


def _kv_memory(args: argparse.Namespace) -> dict[str, Any]:
    """LLM keyword arguments sizing the KV pool: --kv-memory if given, else the GPU fraction (CPU: 8 GiB)."""
    if args.kv_memory is not None:
        return {"max_kv_bytes": int(args.kv_memory * (1 << 30))}
    return {"gpu_memory_utilization": args.gpu_memory_utilization}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the same ``longctx: error: ...`` form as every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"longctx: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from longctx import __version__  # noqa: PLC0415

    parser = _Parser(prog="longctx", description="Long-context inference with composable KV methods")
    parser.add_argument("--version", action="version", version=f"longctx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, sizes, context length and KV bytes per token of a model")
    p.add_argument("path", help="checkpoint folder or .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("methods", help="list every KV method with its parameters")
    p.set_defaults(func=cmd_methods)

    def model_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="weights and KV dtype (default fp32)")
        p.add_argument("--kv-memory", type=_gib, default=None,
                       help="KV cache memory in GiB (default: on a GPU what --gpu-memory-utilization leaves after the "
                            "weights and one step's activations; on the CPU 8)")
        p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                       help="fraction of the GPU's memory the model, activations and KV cache may use (default 0.9)")

    p = sub.add_parser("generate", help="generate text for one or more prompts")
    model_opts(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: none)")
    p.add_argument("--prompt-file", action="append",
                   help="file whose content is a prompt, - for standard input (repeatable; default: none)")
    p.add_argument("--messages-file", help='JSON list of {"role", "content"} chat messages to reply to, '
                   "- for standard input (instead of --prompt; default: none)")
    p.add_argument("--chat", action="store_true",
                   help="format the prompt with the model's chat template (default: off)")
    p.add_argument("--system", help="system message; implies --chat (default: none)")
    p.add_argument("--kv", default="full", help="KV method spec, e.g. 'snapkv:1024' (see `longctx methods`; "
                   "default full)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens, 0 = all (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt, one per line, with the "
                   "text, token ids, finish reason and stats (default: plain text)")
    p.add_argument("--stats", action="store_true", help="print KV memory and timing stats to stderr (default: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="answer one document + question under several KV specs, side by side")
    model_opts(p)
    p.add_argument("--document", help="text file with the document, - for standard input (default: none; "
                   "required unless --messages-file)")
    p.add_argument("--question", help="question asked after the document (default: none; this or --messages-file)")
    p.add_argument("--messages-file", help='JSON list of {"role", "content"} messages instead of --question; the '
                   "document is prepended to the first user message (default: none)")
    p.add_argument("--system", help="system message (default: none)")
    p.add_argument("--kv", default="full; snapkv:512; streamingllm:512",
                   help="KV specs separated by ';' (default 'full; snapkv:512; streamingllm:512')")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="most tokens per answer (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every result (default: a table)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the main job: find a fact hidden in a long text, full vs compressed KV")
    model_opts(p)
    p.add_argument("--tokens", type=int, default=2000, help="haystack length in tokens (default 2000)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) "
                       "with a KV method per request (needs pip install 'longctx[server]')")
    model_opts(p)
    p.add_argument("--kv", default="full", help="KV spec of requests that give no 'kv' field (default full)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0 = any free one (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $LONGCTX_API_KEY, "
                   "else none; the variable keeps the key out of the process list)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the file or folder name)")
    p.add_argument("--max-model-len", type=_positive_int, help="longest prompt + completion in tokens "
                   "(default: the model's context)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=64, help="most requests running at once "
                   "(default 64)")
    p.add_argument("--max-waiting", type=_positive_int, default=1024, help="most requests waiting; beyond it "
                   "requests get 429 with Retry-After (default 1024)")
    p.add_argument("--max-body-mb", type=_nonnegative("MiB"), default=32.0,
                   help="largest request body in MiB; larger ones get 413 (default 32)")
    p.add_argument("--shutdown-timeout", type=_nonnegative("seconds"), default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are aborted "
                   "(default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request (default: log)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="speed/memory sweep on random-weight model shapes vs the floor and HF")
    p.add_argument("--shapes", default="8b", help="comma list of shapes: 1b, 8b, tiny (default 8b)")
    p.add_argument("--contexts", default="4k,16k,64k", help="comma list of context lengths (default 4k,16k,64k)")
    p.add_argument("--batches", default="1", help="comma list of batch sizes (default 1)")
    p.add_argument("--kv", default="full; snapkv:2048; streamingllm:2048", help="KV specs separated by ';'")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weights and KV dtype (default bf16)")
    p.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens generated per point (default 32)")
    p.add_argument("--kv-memory", type=_gib, default=40.0, help="KV pool cap in GiB (default 40)")
    p.add_argument("--no-baseline", action="store_true", help="skip the Hugging Face transformers baseline")
    p.add_argument("--synthetic-heads", type=unit_fraction, metavar="FRACTION",
                   help="head budgets on random weights: write a SYNTHETIC head-score file per shape (this fraction "
                   "of kv-heads marked retrieval at random, nothing measured; into OUT/heads/) and run the specs "
                   "with heads=synthetic on it, e.g. --synthetic-heads 0.5 --kv \"full; budget=duo(heads=synthetic)\" "
                   "(duo's default threshold and razor(threshold=0.5) keep exactly those heads full)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of which heads --synthetic-heads marks "
                   "(default 0)")
    p.add_argument("--out", help="folder for bench.json and the plot")
    p.set_defaults(func=cmd_bench)
    # `longctx bench` with no sub-mode is the sweep above; `longctx bench serve` replays a serving workload.
    bsub = p.add_subparsers(dest="bench_command", metavar="{serve}",
                            help="serve: a serving workload per KV spec at fixed KV memory (default: the sweep)")
    p = bsub.add_parser("serve", help="a serving workload replayed per KV spec at the same fixed KV memory: "
                        "throughput, TTFT/TPOT, concurrency, KV per request, vs HF generate in static batches")
    p.add_argument("--model", help="checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct on the CPU, "
                   "random 8b weights on a GPU)")
    p.add_argument("--shape", help="random weights of a shape instead of --model: 8b (= llama3-8b), 1b "
                   "(= llama3.2-1b) or tiny (default: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto = cuda when available (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and KV dtype; auto = fp32 on the CPU, bf16 on a GPU (default auto)")
    p.add_argument("--kv", action="append", help="KV spec(s), comma- or ';'-separated, repeatable "
                   "(default full,snapkv:1024)")
    p.add_argument("--num-requests", type=_positive_int, default=128, help="requests in the workload (default 128)")
    p.add_argument("--prompt-len", type=_prompt_len, default=(1024, 4096),
                   help="prompt tokens: N, or MIN:MAX drawn uniformly (seeded) (default 1024:4096)")
    p.add_argument("--output-len", type=_positive_int, default=128,
                   help="tokens every request generates (ignore_eos; default 128)")
    p.add_argument("--arrival", default="all", choices=["all", "poisson"],
                   help="all requests before the first step, or Poisson arrivals at --rate (default all)")
    p.add_argument("--rate", type=_positive_float, help="Poisson arrival rate in requests/s (default 4)")
    p.add_argument("--ttft-slo", type=_positive_float,
                   help="seconds: goodput counts only requests whose TTFT is within it (Poisson; default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times (default 0)")
    p.add_argument("--kv-memory", type=_gib, default=8.0,
                   help="the fixed KV memory every spec gets, in GiB (default 8)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=256,
                   help="most sequences running at once (default 256)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192,
                   help="most tokens in one engine step (default 8192)")
    p.add_argument("--baseline", default="hf", choices=["hf", "none"],
                   help="hf: Hugging Face generate in static batches of its best batch size (default hf)")
    p.add_argument("--warmup", type=_count, help="untimed replays of the workload per spec before the measured one "
                   "(default: 1 on a GPU, 0 on the CPU)")
    p.add_argument("--out", help="folder for serve.json and serve.png (default: print the table only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("eval", help="quality vs savings of KV methods: run an evaluation grid, report it")
    esub = p.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("run", help="models x KV specs x tasks x lengths x samples -> OUT/results.jsonl (resumable)")
    p.add_argument("--model", action="append", help="checkpoint folder or .gguf file (repeatable; default SmolLM2)")
    p.add_argument("--tasks", default="needle", help="comma-separated tasks, e.g. needle,ruler,ppl (default needle)")
    p.add_argument("--kv", default="full", help="KV specs separated by ';', e.g. 'full; snapkv:512; streamingllm:512'")
    p.add_argument("--lengths", default="2k", help="context lengths in tokens, e.g. 2k,4k,8k (k = 1024)")
    p.add_argument("--samples", type=_positive_int, default=5, help="samples per task and length (default 5)")
    p.add_argument("--out", required=True, help="output folder (rerunning continues where it stopped)")
    p.add_argument("--haystack", help="text file or folder of *.txt for contexts and perplexity "
                   "(default: built-in synthetic filler)")
    p.add_argument("--seed", type=int, default=0, help="seed of the contexts, needles and sampling (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights and KV dtype (default fp32)")
    p.add_argument("--kv-memory", type=_gib, default=8.0, help="cap on KV cache memory in GiB (default 8)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the model's chat template")
    p.add_argument("--retry-errors", action="store_true", help="rerun results recorded with an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_run)
    p = esub.add_parser("report", help="tables, plots and an HTML page (DIR/report/) from an eval folder")
    p.add_argument("dir", help="the --out folder of `longctx eval run`")
    p.add_argument("--oracle", choices=["transformers"], help="recheck full-cache outputs with HF transformers")
    p.add_argument("--oracle-samples", type=int, default=20, help="most full-cache results the oracle reruns")
    p.add_argument("--device", default="cpu", help="device for the oracle (default cpu)")
    p.add_argument("--no-plots", action="store_true", help="tables and HTML only")
    p.set_defaults(func=cmd_eval_report)

    from longctx.heads.cli import add_parser as add_heads_parser  # noqa: PLC0415

    add_heads_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LongctxError as e:
        print(f"longctx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longctx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. `longctx methods | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
