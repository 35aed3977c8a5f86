"""DuoAttention's calibration (Xiao et al., arXiv:2410.10819): one gate per (layer, kv-head), model frozen.

Every attention layer runs ``a * full + (1 - a) * streaming`` (streaming = the first ``sinks`` tokens plus the
last ``window``; :class:`~longctx.heads.contexts.GatedContext`), and the gates ``a`` are optimised so that the
final hidden states on the supervised answer tokens of synthetic multi-passkey prompts match those of full
attention, under L1 pressure on the gates::

    loss = mean over answer tokens of mean_d (h_full - h_gated)^2  +  reg * sum |a|

Defaults follow the authors' public code (``mit-han-lab/duo-attention``, ``scripts/train.sh`` and the released
``attn_patterns/*/config.json``): sinks 128, window ("recent") 256, reg 0.05, lr 0.02, AdamW without weight decay,
gates initialised to 1 and clamped to [0, 1] before every step, the same warm-up / decay schedule
(``min(1, max((s+1)/(n/5), 0.1), max((n-s)/(n/5), 0.1))``), 10 passkeys, seed 42. Their 2,000 steps on 1K-32K
token contexts need GPUs; the defaults here (``steps``, ``min_length`` / ``max_length``) are sized for a CPU and
are recorded in the score file. On SmolLM2-135M these defaults drive 85 of its 90 gates to exactly 0 (at 1-4K
tokens sinks + window cover much of the prompt, so distillation barely resists the L1 term), and ranking the
zeros (``retrieval=`` fractions) is then arbitrary; ``--reg 0.01`` or 4-8K-token prompts (``--min-length`` /
``--length`` of ``longctx heads score``) rank the heads better (BENCHMARKS.md, attention heads). The paper
writes the regulariser as a sum over heads; the weights (every model parameter) never change and never receive
gradients: only the gates do.

``precision``: the passes run under bf16 autocast (the weights stay as loaded; the gates and the loss stay fp32)
with ``bf16``, or in the model's dtype with ``fp32``; ``auto`` picks bf16 where the device multiplies bf16
natively (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16) and the model is in fp32, else the model's dtype.
The authors train in bf16 on GPUs. On the 2-core AMX CPU a SmolLM2 step at ~1.1K tokens takes ~4.6 s in bf16
against ~8.7 s in fp32 (BENCHMARKS.md). The score file's settings record the precision that ran (never ``auto``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from longctx.errors import LongctxError
from longctx.heads.contexts import FullContext, GatedContext
from longctx.heads.prompts import PromptMaker
from longctx.heads.store import HeadScores


@dataclass(frozen=True)
class DuoSettings:
    """Calibration settings (all recorded in the score file)."""

    steps: int = 100
    lr: float = 0.02
    reg: float = 0.05
    sinks: int = 128
    window: int = 256
    min_length: int = 768
    max_length: int = 1536
    num_passkeys: int = 10
    passkey_digits: int = 8
    seed: int = 42
    precision: str = "auto"  # auto | bf16 | fp32 (see the module docstring)


PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU multiplies bf16 in hardware (AMX or AVX-512 BF16), from ``/proc/cpuinfo``'s flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    """``bf16`` (autocast) or ``fp32`` (the model's own dtype) for a model of ``dtype`` on ``device``."""
    if precision not in PRECISIONS:
        raise LongctxError(f"precision: unknown value {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if dtype != torch.float32:
        return "fp32"  # already in a 16-bit dtype: run as loaded
    if device.type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    return "bf16" if native else "fp32"


def ran_as(precision: str, dtype: torch.dtype) -> str:
    """What a calibration in ``precision`` (resolved) of a model in ``dtype`` ran in, for the score file:
    ``bf16`` autocast, else the model's own dtype (``fp32``, ``bf16`` or ``fp16``)."""
    return "bf16" if precision == "bf16" else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@dataclass
class DuoResult:
    gates: torch.Tensor  # [L, Hkv] in [0, 1]
    losses: list[float]  # total loss per step
    distill: list[float]  # distillation part per step
    precision: str = "fp32"  # what ran: bf16 (autocast), else the model's dtype (fp32 / bf16 / fp16)


def _schedule(steps: int) -> Callable[[int], float]:
    span = max(steps // 5, 1)
    return lambda s: min(1.0, max((s + 1) / span, 0.1), max((steps - s) / span, 0.1))


def calibrate(model: Any, tokenizer: Any, settings: DuoSettings,
              progress: Callable[[int, float], None] | None = None) -> DuoResult:
    """Optimise DuoAttention's gates for ``model`` (a :class:`~longctx.model.decoder.CausalLM`); deterministic for
    ``settings.seed`` on a given device and thread count."""
    cfg = model.config
    device = next(model.parameters()).device
    rng = random.Random(settings.seed)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    maker = PromptMaker(tokenizer, cfg.vocab_size, cfg.bos_token_id)
    gates = torch.nn.Parameter(torch.ones(cfg.num_layers, cfg.num_kv_heads, dtype=torch.float32, device=device))
    opt = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=_schedule(settings.steps))
    flags = [p.requires_grad for p in model.parameters()]
    dtype = next(model.parameters()).dtype
    bf16 = resolve_precision(settings.precision, device, dtype) == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    losses: list[float] = []
    distills: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _step in range(settings.steps):
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            length = rng.randint(settings.min_length, settings.max_length)
            sample = maker.passkey_prompt(length, settings.num_passkeys, settings.passkey_digits, rng)
            ids = torch.tensor(sample.ids, device=device)
            labels = torch.tensor(sample.labels, device=device)
            n = len(sample.ids)
            with torch.no_grad(), autocast():
                target = model(ids, FullContext(cfg, n, device))[labels].float()
            with torch.enable_grad():
                with autocast():
                    hidden = model(ids, GatedContext(cfg, n, device, gates, settings.sinks, settings.window))
                distill = (hidden[labels].float() - target).pow(2).mean(-1).sum() / labels.numel()
                loss = distill + settings.reg * gates.abs().sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            distills.append(float(distill.detach()))
            if progress is not None:
                progress(1, losses[-1])
        with torch.no_grad():
            gates.clamp_(0.0, 1.0)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        torch.random.set_rng_state(gen_state)
    return DuoResult(gates=gates.detach().cpu(), losses=losses, distill=distills,
                     precision=ran_as("bf16" if bf16 else "fp32", dtype))


def score_duo(model: Any, tokenizer: Any, settings: DuoSettings, model_sha256: str, model_name: str,
              progress: Callable[[int, float], None] | None = None) -> HeadScores:
    """:func:`calibrate`, as a score file: ``scores`` are the gates (1 = retrieval head, 0 = streaming head)."""
    cfg = model.config
    result = calibrate(model, tokenizer, settings, progress)
    return HeadScores(method="duo", model_sha256=model_sha256, model_name=model_name, num_layers=cfg.num_layers,
                      num_kv_heads=cfg.num_kv_heads, num_heads=cfg.num_heads,
                      scores=result.gates.double().tolist(), history=result.losses,
                      extra={}, settings=asdict(settings) | {"precision": result.precision})
