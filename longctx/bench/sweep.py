"""``longctx bench``: speed and memory sweeps against the memory floor and a Hugging Face baseline.

Sweeps model shape × context length × batch size × KV spec on random weights
built directly on the device (speed and memory do not depend on weight
values, so no download). For every point it measures time to first token,
time per output token, tokens/s, peak device memory and KV bytes held, and
computes the decode floor: (bytes of weights + bytes of KV actually read per
step) / copy bandwidth, with the copy bandwidth measured at the start of the
same run. Hugging Face ``transformers`` ``generate`` (SDPA) on the same
weights is measured in the same run as the baseline. Results: a printed table
of ratios, JSON, and a plot of time per token vs context length per spec.
At batch > 1 the time per output token is the steady state: the step time while
every sequence of the batch decodes (:func:`steady_decode_step`).

KV bytes held are measured from the pool at the end of each generation (the blocks
the rows hold: per-(layer, kv-head) rows of their own lengths, so a head budget's
streaming rows count sinks + window, whole blocks); ``kv_bytes_held`` is the sum
over the batch, ``kv_bytes_per_seq`` the mean per sequence.

Head budgets (duo, razor, headkv) need a head-score file bound to the model; a
random model has no measured one. ``synthetic_heads=F`` writes a synthetic file per
shape (``longctx.heads.synthetic``: a seeded random fraction F of kv-heads marked
retrieval) and runs every spec with ``heads=synthetic`` on it.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.kv.spec import KVSpec
from longctx.model.config import ModelConfig, RopeConfig
from longctx.model.decoder import CausalLM
from longctx.model.loader import LoadedModel
from longctx.safe_io import open_for_write, prepare_output_dir, write_text

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B and Llama-3-8B shapes (vocab trimmed to 32K: the LM head is not what we measure).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
}
VOCAB = 32768


def shape_config(name: str, max_context: int) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}")
    return ModelConfig(model_type="llama", vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       max_position_embeddings=max(max_context, 8192), rope=RopeConfig(theta=500000.0),
                       layer_types=("full_attention",) * SHAPES[name]["num_layers"], **SHAPES[name])


def random_model(cfg: ModelConfig, device: str, dtype: torch.dtype, seed: int = 0) -> CausalLM:
    """Norms 1, every other weight N(0, 0.02), drawn on ``device`` from ``seed``. The model carries the recipe as
    ``random_recipe``: its content hash (``longctx.heads.binding.recipe_sha256``, what head-score files are bound
    to) hashes that recipe and a sample of the weights instead of all their bytes."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    shape = {k: v for k, v in asdict(cfg).items() if k != "max_position_embeddings"}  # no weight depends on it
    model.random_recipe = {"builder": "longctx.bench.sweep.random_model", "config": shape, "dtype": str(dtype),
                           "seed": seed, "device": torch.device(device).type, "torch": torch.__version__}
    return model.eval()


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (median of 10)."""
    if device == "cpu":
        nbytes = 1 << 27
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    times = sorted(times[2:])
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Point:
    shape: str
    context: int
    batch: int
    spec: str
    engine: str  # longctx | transformers
    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    peak_mem_bytes: int
    kv_bytes_held: int
    floor_s: float
    ratio_to_floor: float
    ratio_to_baseline: float | None = None
    kv_bytes_read: int | None = None  # per decode step, measured from the selections (select methods only)
    kv_bytes_per_seq: int | None = None  # kv_bytes_held / batch


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_floor(weights: int, kv_bytes: int, bandwidth: float) -> float:
    """Seconds of one decode step if it only streamed the weights and the KV it reads at the copy bandwidth
    (bytes read + written per second by a device copy, the measure ``../shared/GPU.md`` defines)."""
    return (weights + kv_bytes) / bandwidth


def measure_longctx(llm: LLM, cfg: ModelConfig, context: int, batch: int, spec: str, new_tokens: int,
                    device: str) -> tuple[float, float, int, int, int | None]:
    g = torch.Generator().manual_seed(context)
    prompts = [torch.randint(0, cfg.vocab_size, (context,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    # Warm up at the same length so compilation and CUDA-graph capture stay out of the timings.
    llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True), kv=spec, share_prefix=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    outs = llm.generate(prompts, params, kv=spec, share_prefix=False)
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    s = outs[0].stats
    reads = [o.stats.kv_bytes_read_per_step for o in outs]
    read = None if any(r is None for r in reads) else int(sum(reads))  # type: ignore[arg-type]
    tpot = s.time_per_output_token if batch == 1 else steady_decode_step(llm, prompts, spec, new_tokens, device)
    return s.time_to_first_token, tpot, peak, sum(o.stats.kv_bytes_held for o in outs), read


def steady_tokens(context: int, batch: int, steps: int, chunk: int = 8192) -> int:
    """Tokens each request may generate in :func:`steady_decode_step` (prompts of up to ``context`` tokens,
    ``chunk`` tokens per step): one per step until every prompt is prefilled, 2 untimed steps, ``steps`` timed
    ones, and a margin. Also the positions the model's context needs past the longest prompt."""
    return steps + batch * -(-context // max(chunk - batch, 1)) + 10


def steady_decode_step(llm: LLM, prompts: list[list[int]], spec: str, steps: int, device: str) -> float:
    """Seconds per engine step while *every* prompt decodes (batch = len(prompts)): the prompts are prefilled
    first (their first tokens made), then ``steps`` pure decode steps of the whole batch are timed, then the
    requests are aborted. (In a plain ``generate`` the first requests decode, and may finish, while later
    prompts still prefill: its TPOT mixes prefill into decode steps and never sees the whole batch decode.)"""
    eng = llm.engine
    chunk = eng.scheduler.max_num_batched_tokens
    bound = steady_tokens(max(map(len, prompts)), len(prompts), steps, chunk)  # nobody finishes before the end
    if max(map(len, prompts)) + bound > llm.config.max_position_embeddings:
        raise ValueError(f"steady-state decode needs {bound} tokens past the prompt; the model's context is "
                         f"{llm.config.max_position_embeddings} (see steady_tokens)")
    params = SamplingParams(max_tokens=bound, ignore_eos=True)
    ids: list[str] = []
    try:
        ids.extend(eng.add_request(p, params, kv=spec, stream=False) for p in prompts)
        reqs = [eng.requests[i] for i in ids]
        while not all(r.output_ids or r.is_finished for r in reqs):
            eng.step()
        for _ in range(2):  # the first steps of the full batch: graph capture at this shape
            eng.step()
        if any(r.is_finished for r in reqs):
            raise RuntimeError("a request finished before the whole batch decoded (does the batch fit the KV "
                               "memory?)")
        preempted = sum(r.num_preemptions for r in reqs)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        _sync(device)
        elapsed = time.perf_counter() - t
        if any(r.is_finished for r in reqs) or sum(r.num_preemptions for r in reqs) != preempted:
            raise RuntimeError("a request finished or was preempted during the timed decode steps")
    finally:
        for i in ids:
            eng.abort(i)
        while eng.has_unfinished_requests():
            eng.step()
    return elapsed / steps


def hf_llama(model: CausalLM, cfg: ModelConfig, device: str):  # noqa: ANN201
    """A Hugging Face ``LlamaForCausalLM`` (SDPA) sharing ``model``'s weight tensors (no copy)."""
    import transformers  # noqa: PLC0415

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope.theta, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(model.state_dict(), assign=True, strict=True)  # shares our weight tensors
    # The rotary table is a non-persistent buffer, still on meta: build a real one.
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    return hf.eval()


def measure_transformers(model: CausalLM, cfg: ModelConfig, context: int, batch: int, new_tokens: int,
                         device: str) -> tuple[float, float, int] | None:
    try:
        hf = hf_llama(model, cfg, device)
    except ImportError:
        return None
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync(device)
        return time.perf_counter() - t

    run(2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = run(1)
    tn = run(new_tokens)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return t1, (tn - t1) / (new_tokens - 1), peak


def run_bench(shapes: list[str], contexts: list[int], batches: list[int], specs: list[str], device: str = "cuda",
              dtype: str = "bf16", new_tokens: int = 32, baseline: bool = True, out: Path | None = None,
              block_size: int = 16, kv_memory_gb: float = 40.0, synthetic_heads: float | None = None,
              synthetic_seed: int = 0) -> list[Point]:
    """``synthetic_heads``: the retrieval fraction of the synthetic head-score file written per shape for the specs
    with ``heads=synthetic`` (into ``out/heads/``, or a temporary folder), chosen by ``synthetic_seed``."""
    from longctx.heads import synthetic  # noqa: PLC0415

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if any(synthetic.uses_synthetic(s) for s in specs) and synthetic_heads is None:
        raise ValueError("a spec has heads=synthetic: give synthetic_heads (--synthetic-heads FRACTION)")
    if out:
        out = prepare_output_dir(out)  # fail now, not after the whole benchmark
    heads_dir = (out / "heads" if out else Path(tempfile.mkdtemp(prefix="longctx-bench-heads-"))) \
        if synthetic_heads is not None else None
    heads_files: dict[str, str] = {}
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth (read+write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    points: list[Point] = []
    for shape in shapes:
        steady = steady_tokens(max(contexts), max(batches), new_tokens) if max(batches) > 1 else 0
        cfg = shape_config(shape, max(contexts) + max(new_tokens, steady))
        model = random_model(cfg, device, torch_dtype)
        weights = weight_bytes(model)
        loaded = LoadedModel(model, cfg, None, Path(f"<random {shape}>"))

        def make_llm(preallocate: bool, loaded: LoadedModel = loaded) -> LLM:
            return LLM(loaded, device=device, dtype=torch_dtype, block_size=block_size, max_num_seqs=max(batches),
                       max_kv_bytes=int(kv_memory_gb * (1 << 30)), preallocate_kv=preallocate)

        # fp rows: the pool preallocated at --kv-memory (CUDA graphs never see it move). Quantized rows need
        # room for their own pool inside the same byte budget, so their engine grows its pools on demand (in
        # the warm-up run; graphs are re-captured when a pool moves).
        llm = make_llm(device.startswith("cuda"))
        quant_llm: LLM | None = None
        run_specs = dict(zip(specs, specs, strict=True))
        if heads_dir is not None:  # bound to this model's hash; quant_llm shares the model, so the file fits it too
            path = synthetic.write_for_llm(llm, heads_dir / f"synthetic-{shape}.json", synthetic_heads, synthetic_seed)
            heads_files[shape] = str(path)
            run_specs = {s: synthetic.with_heads_file(s, path) for s in specs}
            print(f"synthetic head scores (not measured; {synthetic_heads:g} of the kv-heads retrieval, seed "
                  f"{synthetic_seed}) for heads=synthetic: {path}", flush=True)
        for context in contexts:
            for batch in batches:
                base_tpot = None
                if baseline:
                    try:
                        hf = measure_transformers(model, cfg, context, batch, new_tokens, device)
                    except torch.OutOfMemoryError:
                        hf = None
                        torch.cuda.empty_cache()
                    if hf is not None:
                        ttft, tpot, peak = hf
                        kv_full = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * batch * 2
                        floor = decode_floor(weights, kv_full, bandwidth)
                        base_tpot = tpot
                        points.append(Point(shape, context, batch, "full", "transformers", ttft, tpot,
                                            batch / tpot, peak, kv_full, floor, tpot / floor, 1.0,
                                            kv_bytes_per_seq=kv_full // batch))
                        _print(points[-1])
                for spec in specs:
                    engine = llm
                    if KVSpec.parse(spec).quant.name != "none":
                        if quant_llm is None:
                            quant_llm = make_llm(False)
                        engine = quant_llm
                    ttft, tpot, peak, kv_held, kv_read = measure_longctx(engine, cfg, context, batch,
                                                                         run_specs[spec], new_tokens, device)
                    # a select method's floor: the weights plus what its steps really read (selected KV and
                    # its own data, e.g. block summaries), measured from the selections
                    floor = decode_floor(weights, kv_held if kv_read is None else kv_read, bandwidth)
                    points.append(Point(shape, context, batch, spec, "longctx", ttft, tpot, batch / tpot, peak,
                                        kv_held, floor, tpot / floor, tpot / base_tpot if base_tpot else None,
                                        kv_read, kv_held // batch))
                    _print(points[-1])
        del llm, quant_llm, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if out:
        body: dict[str, Any] = {"copy_bandwidth": bandwidth, "points": [asdict(p) for p in points]}
        if heads_files:
            body["synthetic_heads"] = {"fraction": synthetic_heads, "seed": synthetic_seed, "files": heads_files}
        write_text(out / "bench.json", json.dumps(body, indent=1))
        plot(points, out / "tpot_vs_context.png")
    print_table(points)
    return points


def _print(p: Point) -> None:
    per_seq = f"  KV/seq {p.kv_bytes_per_seq / 2**30:.3f} GiB" if p.kv_bytes_per_seq is not None else ""
    print(f"  {p.shape} ctx {p.context} b{p.batch} {p.engine:<12} {p.spec:<22} ttft {p.ttft_s * 1e3:8.1f} ms  "
          f"tpot {p.tpot_s * 1e3:7.2f} ms  floor {p.floor_s * 1e3:6.2f} ms  x{p.ratio_to_floor:5.2f}{per_seq}",
          flush=True)


def print_table(points: list[Point]) -> None:
    w = max([22] + [len(p.spec) for p in points])
    head = (f"{'shape':<5} {'ctx':>7} {'batch':>5} {'engine':<12} {'spec':<{w}} {'TTFT ms':>9} {'TPOT ms':>8} "
            f"{'floor ms':>8} {'x floor':>7} {'x HF':>6} {'tok/s':>8} {'KV held':>9} {'KV/seq':>9} {'KV read':>9} "
            f"{'peak mem':>9}")
    print(head)
    print("-" * len(head))
    for p in points:
        hf = f"{p.ratio_to_baseline:.2f}" if p.ratio_to_baseline is not None else "-"
        read = f"{p.kv_bytes_read / 2**30:>8.3f}G" if p.kv_bytes_read is not None else f"{'-':>9}"
        per_seq = f"{p.kv_bytes_per_seq / 2**30:>8.3f}G" if p.kv_bytes_per_seq is not None else f"{'-':>9}"
        print(f"{p.shape:<5} {p.context:>7} {p.batch:>5} {p.engine:<12} {p.spec:<{w}} {p.ttft_s * 1e3:>9.1f} "
              f"{p.tpot_s * 1e3:>8.2f} {p.floor_s * 1e3:>8.2f} {p.ratio_to_floor:>7.2f} {hf:>6} "
              f"{p.tokens_per_s:>8.1f} {p.kv_bytes_held / 2**30:>8.2f}G {per_seq} {read} "
              f"{p.peak_mem_bytes / 2**30:>8.2f}G")


def plot(points: list[Point], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(p.shape, p.batch, p.engine, p.spec) for p in points})
    for shape, batch, engine, spec in keys:
        pts = sorted((p.context, p.tpot_s * 1e3) for p in points
                     if (p.shape, p.batch, p.engine, p.spec) == (shape, batch, engine, spec))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{engine} {spec} ({shape}, b{batch})")
    floors = sorted({(p.context, p.floor_s * 1e3) for p in points if p.spec == "full" and p.engine == "longctx"})
    if floors:
        ax.plot([x for x, _ in floors], [y for _, y in floors], "k--", label="floor (full KV)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per output token (ms)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with open_for_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
