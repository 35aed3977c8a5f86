"""Parity of longctx's KV-cache methods with NVIDIA kvpress (issue 15): both libraries, same token ids, greedy.

For each needle prompt (built by longctx's eval code: the ``needle`` task over the shared corpora, as
``longctx eval run --haystack`` would, wrapped in the chat template) the prompt is tokenized once; then

- kvpress: a transformers model loaded from the same checkpoint (``gguf_file=`` for a ``.gguf``), the press for
  the method at ``--ratio`` applied to the whole prompt during prefill (``with press(model):``, as kvpress's
  README shows; the prompt is all context, no separate question, so both libraries compress the same tokens),
  then greedy decoding of ``--new-tokens`` tokens on the compressed cache, as kvpress's pipeline decodes;
- longctx: ``LLM(model).generate(ids, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True), kv=SPEC)``
  with the spec that mirrors the press's settings (:func:`longctx_spec`).

It prints, per method, the prompts, the token-identical generations, the mean common prefix and the positions
of first divergence. Not part of CI: it needs kvpress, which is not one of longctx's dependencies.

kvpress 0.5.5 needs transformers < 5.3 (the project's venv has a newer one), so install it apart, e.g. into a
folder that only this script puts on ``sys.path`` (``--kvpress-path``)::

    python -m pip install --target /tmp/kvp_site --no-deps kvpress==0.5.5 transformers==5.2.0 \\
        huggingface-hub==1.33.0 tokenizers==0.22.2 "cachetools<6" "fire<0.7" termcolor six datasets pyarrow \\
        "dill<0.4.2" pandas python-dateutil xxhash "multiprocess<0.70.20"
    python scripts/kvpress_parity.py --kvpress-path /tmp/kvp_site --lengths 1024 --samples 2 --new-tokens 16

(the extra packages are what kvpress imports and the project's venv lacks; in a separate venv a plain
``pip install kvpress==0.5.5`` plus ``pip install -e .`` does the same). Exit status: 0 when every comparison
ran, whatever the agreement; 2 when kvpress cannot be used; 1 when something crashed.

How kvpress's settings map to longctx (read from kvpress 0.5.5's presses):

- the budget: kvpress keeps ``max(1, int(L * (1 - ratio)))`` of an L-token prompt in every layer and kv-head
  (``compute_n_kept``) -> ``budget=uniform(tokens=that)``. kvpress compresses only the prompt and never evicts
  while decoding -> ``slack=N`` (longctx evicts while decoding only once a row holds budget + slack tokens);
- ``SnapKVPress(window_size=w, kernel_size=k)``: mean attention of the last w queries over the kv-head's group,
  ``avg_pool1d`` (zero padding counted), the window always kept -> ``retain=snapkv(window=w,kernel=k,
  pooling=avg)`` (longctx sums instead of averaging: the same order; it always keeps the last w tokens);
- ``StreamingLLMPress(n_sink=s)`` -> ``retain=streamingllm(num_sinks=s)``;
- ``TOVAPress``: the last query's attention averaged over all heads of the layer (one score for every kv-head),
  the last token always kept -> ``retain=tova(per_head=false)`` (longctx keeps the last token by its score);
- ``KnormPress``: lowest key L2 norm -> ``retain=keynorm(num_sinks=0,recent=0)``;
- ``PyramidKVPress(window_size, kernel_size, beta)`` -> the snapkv retain with ``budget=pyramid(tokens=base,
  beta=beta)`` when longctx's layer budgets equal kvpress's for that prompt (kvpress clips the bottom layer at
  L - window and falls back to SnapKV with ``round(L * (1 - ratio))`` when the pyramid would be too steep; the
  fallback maps to the uniform budget, a clipped pyramid has no longctx equivalent and is skipped);
- ``AdaKVPress(SnapKVPress(...), alpha_safeguard=a)`` -> the snapkv retain with ``budget=adaptive(alpha=a)``
  (the two split a layer's budget across heads differently: compared, not expected identical).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.bench.common import common_prefix

KVPRESS_VERSION = "0.5.5"
INSTALL_HINT = (f"python -m pip install --target /tmp/kvp_site --no-deps kvpress=={KVPRESS_VERSION} "
                "transformers==5.2.0 huggingface-hub==1.33.0 tokenizers==0.22.2 'cachetools<6' 'fire<0.7' termcolor "
                "six datasets pyarrow 'dill<0.4.2' pandas python-dateutil xxhash 'multiprocess<0.70.20' "
                "and pass --kvpress-path /tmp/kvp_site (or pip install kvpress==0.5.5 in a separate venv)")

# kvpress 0.5.5's defaults for each press this script compares (the press class, then its settings).
KVPRESS_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("", {}),
    "snapkv": ("SnapKVPress", {"window_size": 64, "kernel_size": 5}),
    "streamingllm": ("StreamingLLMPress", {"n_sink": 4}),
    "tova": ("TOVAPress", {}),
    "knorm": ("KnormPress", {}),
    "pyramidkv": ("PyramidKVPress", {"window_size": 64, "kernel_size": 5, "beta": 20}),
    "adakv": ("AdaKVPress", {"window_size": 64, "kernel_size": 5, "alpha_safeguard": 0.2}),
}
DEFAULT_METHODS = "full,snapkv,streamingllm,tova,knorm"


class NoEquivalent(ValueError):
    """The press's settings have no longctx spec for this prompt (the comparison is skipped)."""


class KvpressUnavailable(RuntimeError):
    """kvpress cannot be imported or used with the transformers it finds."""


# ---- method and argument parsing ------------------------------------------------------------------------------
def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    raise ValueError(f"expected a number or true/false, got {text!r}")


def parse_methods(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"snapkv,pyramidkv(beta=4),streamingllm(n_sink=8)"`` -> [(name, kvpress settings with defaults filled)]."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        name, _, body = part.partition("(")
        name = name.strip().lower()
        if name not in KVPRESS_DEFAULTS:
            raise ValueError(f"unknown method {name!r}; choose from: {', '.join(KVPRESS_DEFAULTS)}")
        if body and not body.endswith(")"):
            raise ValueError(f"{part!r}: expected name(key=value,...)")
        settings = dict(KVPRESS_DEFAULTS[name][1])
        for item in filter(None, (s.strip() for s in body[:-1].split(","))):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in settings:
                raise ValueError(f"{name}: unknown setting {item!r}; settings: {', '.join(settings) or '(none)'}")
            settings[key] = _value(raw)
        out.append((name, settings))
    if not out:
        raise ValueError("no methods given")
    return out


def _lengths(text: str) -> list[int]:
    out = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        if n < 1:
            raise argparse.ArgumentTypeError(f"lengths must be positive, got {part!r}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no lengths given")
    return out


def _methods(text: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        return parse_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ratio(text: str) -> float:
    r = float(text)
    if not 0.0 <= r < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text!r}")
    return r


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _depths(text: str) -> list[float]:
    out = [float(p) for p in text.split(",") if p.strip()]
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise argparse.ArgumentTypeError(f"depths must be values in [0, 1], got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare longctx's KV methods with kvpress's presses token by token.")
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint folder (default: the cached SmolLM2 "
                   "at ~/.cache/longctx/SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--methods", type=_methods, default=parse_methods(DEFAULT_METHODS),
                   help=f"comma-separated, each NAME or NAME(setting=value,...) in kvpress's terms; names: "
                        f"{', '.join(KVPRESS_DEFAULTS)} (default {DEFAULT_METHODS})")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="kvpress compression ratio: fraction pruned (0.5)")
    p.add_argument("--lengths", type=_lengths, default=[1024, 2048], help="haystack lengths in tokens (1024,2048)")
    p.add_argument("--samples", type=_positive, default=2, help="needle samples per length (2)")
    p.add_argument("--depths", type=_depths, default=[0.5], help="needle depths, each a prompt per sample (0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needle prompts (0)")
    p.add_argument("--new-tokens", type=_positive, default=32, help="greedy tokens generated per prompt (32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and KV dtype of both (fp32)")
    p.add_argument("--haystack", help="text file or folder of *.txt (default: the shared corpora, as the eval "
                   "finds them: $LONGCTX_CORPORA or ../shared/data/corpora; else longctx's built-in haystack)")
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompts in the chat template")
    p.add_argument("--kvpress-path", help="folder put first on sys.path before importing kvpress (a pip --target)")
    p.add_argument("--out", help="write every prompt's result here as JSON")
    return p.parse_args(argv)


# ---- kvpress's budgets, and the longctx spec that mirrors a press -----------------------------------------------
def kvpress_n_kept(prompt_len: int, ratio: float) -> int:
    """kvpress 0.5.5's ``compute_n_kept``: KV pairs each layer and kv-head keeps of a ``prompt_len`` prompt."""
    if ratio >= 1.0:
        return 0
    return max(1, int(prompt_len * (1 - ratio)))


def kvpress_pyramid_budgets(prompt_len: int, ratio: float, window: int, beta: float, num_layers: int) -> list[int]:
    """kvpress 0.5.5's ``PyramidKVPress.get_layer_budget`` for every layer (the SnapKV fallback included)."""
    cap = window + prompt_len * (1 - ratio)
    min_num = (cap - window) / beta
    max_num = (cap - window) * 2 - min_num
    if max_num >= prompt_len - window:
        max_num = prompt_len - window
        min_num = (cap - window) * 2 - max_num
    if not (prompt_len >= max_num >= min_num >= window):
        return [max(1, round(prompt_len * (1 - ratio)))] * num_layers
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return [round(max_num - i * steps) for i in range(num_layers)]


def _snapkv_retain(settings: dict[str, Any]) -> str:
    return f"retain=snapkv(window={settings['window_size']},kernel={settings['kernel_size']},pooling=avg)"


def longctx_spec(method: str, settings: dict[str, Any], prompt_len: int, ratio: float, new_tokens: int,
                 num_layers: int | None = None) -> str:
    """The longctx KV spec that mirrors kvpress's ``method`` press with ``settings`` at ``ratio`` on a
    ``prompt_len``-token prompt generating ``new_tokens`` tokens. Raises :class:`NoEquivalent` when none does."""
    if method == "full":
        return "full"
    if method not in KVPRESS_DEFAULTS:
        raise ValueError(f"unknown method {method!r}")
    n = kvpress_n_kept(prompt_len, ratio)
    slack = new_tokens  # kvpress never evicts while decoding: no decode step may reach budget + slack
    uniform = f"budget=uniform(tokens={n},slack={slack})"
    if method == "snapkv":
        return f"{_snapkv_retain(settings)} {uniform}"
    if method == "streamingllm":
        return f"retain=streamingllm(num_sinks={settings['n_sink']}) {uniform}"
    if method == "tova":
        return f"retain=tova(per_head=false) {uniform}"
    if method == "knorm":
        return f"retain=keynorm(num_sinks=0,recent=0) {uniform}"
    if method == "adakv":
        alpha = settings["alpha_safeguard"]
        return f"{_snapkv_retain(settings)} budget=adaptive(tokens={n},slack={slack},alpha={alpha})"
    assert method == "pyramidkv"
    if num_layers is None:
        raise ValueError("pyramidkv needs num_layers")
    window, beta = settings["window_size"], settings["beta"]
    want = kvpress_pyramid_budgets(prompt_len, ratio, window, beta, num_layers)
    if len(set(want)) == 1:  # kvpress's fallback to SnapKV
        return f"{_snapkv_retain(settings)} budget=uniform(tokens={want[0]},slack={slack})"
    from longctx.kv.budget.pyramid import Pyramid  # noqa: PLC0415

    exact = prompt_len * (1 - ratio)
    for base in sorted({max(1, int(exact)), max(1, round(exact)), max(1, math.ceil(exact))}):
        if Pyramid(tokens=base, beta=float(beta)).layer_budgets(base, num_layers) == want:
            return f"{_snapkv_retain(settings)} budget=pyramid(tokens={base},slack={slack},beta={float(beta)!r})"
    clipped = 2 * exact - exact / beta >= prompt_len - window
    why = f"kvpress clips the bottom layer at prompt - window = {prompt_len - window}" if clipped else \
        f"kvpress's base {exact:g} is not a whole number of tokens"
    raise NoEquivalent(f"pyramidkv at {prompt_len} tokens, ratio {ratio}: kvpress's layer budgets "
                       f"{want[0]}..{want[-1]} match no longctx pyramid ({why})")


def press_label(method: str, settings: dict[str, Any], ratio: float) -> str:
    cls, _ = KVPRESS_DEFAULTS[method]
    if not cls:
        return "(no press)"
    args = ", ".join([f"compression_ratio={ratio}", *(f"{k}={v}" for k, v in settings.items())])
    if method == "adakv":
        inner = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "alpha_safeguard")
        return (f"AdaKVPress(SnapKVPress(compression_ratio={ratio}, {inner}), "
                f"alpha_safeguard={settings['alpha_safeguard']})")
    return f"{cls}({args})"


# ---- kvpress side ----------------------------------------------------------------------------------------------
def import_kvpress(path: str | None) -> Any:
    """kvpress, from ``path`` (put first on sys.path) or wherever Python finds it, checked against the
    transformers it imports. Raises :class:`KvpressUnavailable` with a one-line reason and the pip command."""
    if path:
        if not Path(path).is_dir():
            raise KvpressUnavailable(f"--kvpress-path {path}: no such folder; install with: {INSTALL_HINT}")
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import kvpress  # noqa: PLC0415
    except Exception as e:  # ImportError, or a missing dependency of kvpress raising at import
        raise KvpressUnavailable(f"kvpress is not importable ({type(e).__name__}: {e}); install it with: "
                                 f"{INSTALL_HINT}") from None
    import transformers  # noqa: PLC0415
    from packaging.requirements import Requirement  # noqa: PLC0415

    try:
        from importlib.metadata import requires, version  # noqa: PLC0415

        kv_version = version("kvpress")
        needs = [Requirement(r) for r in requires("kvpress") or []]
    except Exception:  # noqa: BLE001 - metadata missing: no check
        kv_version, needs = getattr(kvpress, "__version__", "?"), []
    for req in needs:
        if req.name == "transformers" and not req.marker and transformers.__version__ not in req.specifier:
            raise KvpressUnavailable(f"kvpress {kv_version} needs transformers{req.specifier}, found "
                                     f"{transformers.__version__} ({transformers.__file__}); install with: "
                                     f"{INSTALL_HINT}")
    kvpress.__parity_version__ = kv_version
    return kvpress


def make_press(kvp: Any, method: str, settings: dict[str, Any], ratio: float) -> Any:
    if method == "full":
        return None
    if method == "adakv":
        inner = {k: v for k, v in settings.items() if k != "alpha_safeguard"}
        return kvp.AdaKVPress(kvp.SnapKVPress(compression_ratio=ratio, **inner),
                              alpha_safeguard=settings["alpha_safeguard"])
    return getattr(kvp, KVPRESS_DEFAULTS[method][0])(compression_ratio=ratio, **settings)


def load_hf_model(model: Path, device: str, dtype: str) -> Any:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF conversion's progress bar
        if model.suffix == ".gguf":
            m = AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name, dtype=torch_dtype)
        else:
            m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype)
    return m.to(device).eval()


def kvpress_generate(model: Any, press: Any, ids: list[int], new_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens after prefilling ``ids`` under ``press`` (None: no compression), decoded as kvpress's
    pipeline decodes (positions continue from the prompt length; the press is off while decoding); and the
    tokens layer 0 holds after the prefill."""
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        cache = DynamicCache()
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=x, past_key_values=cache, logits_to_keep=1)
        kept = cache.get_seq_length(0)
        tok = out.logits[0, -1].argmax()
        generated = [int(tok)]
        position = torch.tensor([[len(ids)]], device=model.device)
        for i in range(new_tokens - 1):
            out = model(input_ids=tok.view(1, 1), past_key_values=cache, position_ids=position + i)
            tok = out.logits[0, -1].argmax()
            generated.append(int(tok))
    return generated, kept


# ---- comparison ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    press: str
    spec: str
    prompts: int = 0
    identical: int = 0
    prefix_sum: int = 0
    divergences: list[int] | None = None
    skipped: int = 0
    new_tokens: int = 0

    def add(self, a: list[int], b: list[int]) -> int:
        n = common_prefix(a, b)
        self.prompts += 1
        self.prefix_sum += n
        if a == b:
            self.identical += 1
        else:
            self.divergences = [*(self.divergences or []), n]
        return n


def format_table(rows: list[Row]) -> str:
    head = ["method", "kvpress press", "longctx spec (first prompt)", "prompts", "token-identical",
            "mean common prefix", "first divergence at"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        mean = f"{r.prefix_sum / r.prompts:.1f} / {r.new_tokens}" if r.prompts else "-"
        div = ", ".join(map(str, r.divergences)) if r.divergences else "-"
        if r.skipped:
            div += f" ({r.skipped} skipped: no equivalent)"
        spec = f"`{r.spec}`" if r.spec else "(no equivalent)"
        lines.append(f"| {r.method} | {r.press} | {spec} | {r.prompts} | {r.identical}/{r.prompts} | {mean} "
                     f"| {div} |")
    return "\n".join(lines)


def build_prompts(llm: Any, args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """(sample id, token ids) of each needle prompt, as the eval's ``needle`` task builds them."""
    from longctx.eval import haystack as hmod  # noqa: PLC0415
    from longctx.eval.needle import builtin_haystack  # noqa: PLC0415
    from longctx.eval.runner import prompt_text  # noqa: PLC0415
    from longctx.eval.tasks.needle import NeedleTask  # noqa: PLC0415

    source = args.haystack or hmod.default_corpus()
    text = hmod.load_haystack(source) if source else builtin_haystack()
    print(f"haystack: {source or 'longctx built-in (Persuasion excerpt)'}", flush=True)
    task = NeedleTask(depths=args.depths)
    out = []
    for length in args.lengths:
        for s in task.samples(llm.tokenizer, length, args.samples, args.seed, text):
            for q in s.questions:
                out.append((s.sample_id, llm.encode(prompt_text(s, q), chat=not args.no_chat)))
    return out


def run(args: argparse.Namespace, kvp: Any) -> int:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from longctx.engine.llm import LLM  # noqa: PLC0415
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415

    if args.model:
        model_path = Path(args.model).expanduser()
    else:
        from longctx.model.default_model import default_model_path  # noqa: PLC0415

        model_path = default_model_path()
    torch.manual_seed(0)
    t0 = time.time()
    llm = LLM(model_path, device=args.device, dtype=args.dtype)
    hf = load_hf_model(model_path, args.device, args.dtype)
    print(f"kvpress {kvp.__parity_version__} (transformers {transformers.__version__}, torch {torch.__version__}) vs "
          f"longctx; model {model_path}; {args.device} {args.dtype}; ratio {args.ratio}; {args.new_tokens} new tokens; "
          f"loaded in {time.time() - t0:.0f} s", flush=True)
    prompts = build_prompts(llm, args)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    num_layers = llm.config.num_layers
    rows, records = [], []
    for method, settings in args.methods:
        press = make_press(kvp, method, settings, args.ratio)
        row = Row(method, press_label(method, settings, args.ratio), "", new_tokens=args.new_tokens)
        for sample_id, ids in prompts:
            try:
                spec = longctx_spec(method, settings, len(ids), args.ratio, args.new_tokens, num_layers)
            except NoEquivalent as e:
                row.skipped += 1
                print(f"[{method}] {sample_id}: skipped: {e}", flush=True)
                records.append({"method": method, "sample_id": sample_id, "prompt_tokens": len(ids), "skipped": str(e)})
                continue
            row.spec = row.spec or spec
            t = time.time()
            ours = llm.generate([ids], params, kv=spec)[0].outputs[0].token_ids
            t_ours = time.time() - t
            t = time.time()
            theirs, kept = kvpress_generate(hf, press, ids, args.new_tokens)
            t_theirs = time.time() - t
            n = row.add(theirs, ours)
            same = "identical" if theirs == ours else f"diverge at {n}"
            print(f"[{method}] {sample_id} ({len(ids)} tokens, kvpress keeps {kept}): {same} "
                  f"(longctx {t_ours:.1f} s, kvpress {t_theirs:.1f} s)", flush=True)
            if theirs != ours:
                print(f"    kvpress: {llm.tokenizer.decode(theirs)!r}\n    longctx: {llm.tokenizer.decode(ours)!r}",
                      flush=True)
            records.append({"method": method, "sample_id": sample_id, "prompt_tokens": len(ids), "spec": spec,
                            "press": row.press, "kvpress_kept_layer0": kept, "kvpress_ids": theirs,
                            "longctx_ids": ours, "identical": theirs == ours, "common_prefix": n})
        rows.append(row)
    table = format_table(rows)
    print(f"\n{len(prompts)} prompts ({', '.join(map(str, args.lengths))} tokens of haystack x {args.samples} "
          f"samples x depths {args.depths}), ratio {args.ratio}, {args.new_tokens} greedy tokens, kvpress "
          f"{kvp.__parity_version__}; total {time.time() - t0:.0f} s\n{table}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "kvpress": kvp.__parity_version__, "transformers": transformers.__version__, "model": str(model_path),
            "device": args.device, "dtype": args.dtype, "ratio": args.ratio, "new_tokens": args.new_tokens,
            "lengths": args.lengths, "samples": args.samples, "depths": args.depths, "seed": args.seed,
            "table": table, "results": records}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        kvp = import_kvpress(args.kvpress_path)
    except KvpressUnavailable as e:
        print(f"kvpress_parity: {e}", file=sys.stderr)
        return 2
    return run(args, kvp)


if __name__ == "__main__":
    sys.exit(main())
